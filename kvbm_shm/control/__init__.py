"""The coordinator: the one process that owns the state of every block of an instance.

- `pool`: one G2 pool's block state (free list, registry, pins, inactive set, eviction).
- `leases`: client leases; what each client pins and is writing.
- `devices`: the device tier (G1): registered engine tensors, offload/onboard transfers, waits.
- `coordinator`: request handlers over pools and leases; no sockets, no threads of its own.
- `disk_tier`: the disk tier (G3): write-back with admission, staging of G3 hits into G2, over
  the files and indexes of `kvbm_shm.disk`.
- `supervisor`: worker processes of one kind (disk I/O, transfers): start, feed, restart.
- `server`: the ZeroMQ loop, runtime directory, events and signals around a `Coordinator`.
"""
