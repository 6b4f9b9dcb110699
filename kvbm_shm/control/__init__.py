"""The coordinator: the one process that owns the state of every block of an instance.

- `pool`: one G2 pool's block state behind a narrow face (lifecycle calls and reads; nobody
  else touches its block table or registry). G2 is the hub every other tier moves bytes through.
- `leases`: client leases; what each client pins and is writing.
- `tier`: the contract every other tier implements (`Tier` hooks, `Staging`, `Deferred`, the
  `TierEvents` sink of KV events, counters and transfers).
- `devices`: the device tier (G1): registered engine tensors, offload/onboard transfers, waits.
- `disk_tier`: the disk tier (G3): write-back with admission, staging of G3 hits into G2, over
  the files and indexes of `kvbm_shm.disk`.
- `coordinator`: request handlers over pools and leases, and the list of tiers it calls each
  hook on; no sockets, no threads of its own. Tiers never see it: each gets the lease table, a
  pool lookup, its worker group and the event sink.
- `supervisor`: worker processes of one kind (disk I/O, transfers): start, feed, restart.
- `metrics`: Prometheus metrics, read at scrape time and heard from the tiers' transfers.
- `connections`: the file-descriptor budget of control connections.
- `server`: the ZeroMQ loop, runtime directory, events and signals around a `Coordinator`.
"""
