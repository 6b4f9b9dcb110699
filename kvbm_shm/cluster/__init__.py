"""The cluster tier's machinery (G4), free of the coordinator: etcd membership (`etcd`,
`membership`), CURVE keys and the authenticated TCP endpoints (`keys`, `endpoint`), the index of
what peers hold (`index`), RPC to a peer coordinator (`peers`), NIXL reads (`transport`), and the
threads that run them (`node`). `control.cluster_tier` is the only user inside the coordinator."""
