"""Read-only views of a node's kvbm state, for operators and their tools (`kvbm-shm ls`,
`inspect`, `top`, `events`, `gc`). Nothing here imports torch or needs a GPU.

- `procfs`: what /proc says about processes (alive, which kvbm files they map or hold open).
- `node`: every kvbm segment and runtime directory on the node, whose it is, whether it is orphaned.
- `snapshot`: one instance's pools read straight from shared memory (seqlock-consistent), live or post-mortem.
- `probe`: lease-less requests to a live coordinator (tools never appear as its clients).
- `live`: rates and usage between two coordinator stats samples (what `top` shows).
- `gc`: removing what dead instances left behind, under the instance lock.
- `events`: subscribing to a coordinator's KV event stream.
"""
