"""Worker processes, started and supervised by the coordinator (`control.supervisor`).

- `base`: the worker side of the job protocol, shared by every kind.
- `transfer`: G1 <-> G2 copies through imported engine tensors (CUDA IPC or the CPU stand-in).
"""
