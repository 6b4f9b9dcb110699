"""Worker processes, started and supervised by the coordinator (`control.supervisor`).

- `base`: the worker side of the job protocol, shared by every kind.
- `disk_io`: G2 <-> G3 block I/O (pwritev/preadv from and into shm, O_DIRECT, verified reads).
- `transfer`: G1 <-> G2 copies through imported engine tensors (CUDA IPC or the CPU stand-in).
"""
