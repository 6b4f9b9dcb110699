"""Copy engines: move the chunks of KV blocks between an engine's tensors and contiguous blocks.

Every engine works from a `layout.ChunkTable` (where each chunk of a device block lives) and
the addresses of the contiguous G2 blocks. `gather` copies device blocks into G2 blocks
(offload/store); `scatter` copies G2 blocks into device blocks (onboard/load).

- `cpu_copy`: host memory on both sides (CPU engines and the CPU stand-in of a GPU engine), through
  `_batch_copy.c`, a batched copy with non-temporal stores (built at install; optional).
- `cuda_copy`: a GPU and page-locked host memory: an NVRTC gather/scatter kernel and a DMA path.
- `cuda_driver`: cuda-python loaded on first use; devices by UUID; nothing at import time.
- `host_register`: cuMemHostRegister of a process's own mapping of a G2 segment.
"""
