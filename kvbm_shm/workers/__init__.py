"""Worker processes, started and supervised by the coordinator (`control.supervisor`).

- `base`: the worker side of the job protocol, shared by every kind.
"""
