"""G1, the engines' device KV: how an engine's tensors are shared with the service.

- `standin`: the CPU stand-in for a GPU's KV tensors (a shm segment exported by name), so that
  every device flow runs without a GPU.
- `ipc`: tensor descriptions (`TensorView`), export in the engine and import in a transfer worker
  (`HandleCache`), for the stand-in and for CUDA tensors.
- `cuda_ipc`: legacy CUDA IPC handles and VMM file descriptors (export and import).
- `fd_passing`: file descriptors between processes over AF_UNIX (SCM_RIGHTS).
- `client`: `DeviceKv`, an engine's registered KV tensors and its transfer requests.
"""
