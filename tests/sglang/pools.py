"""SGLang's own objects on CPU for the backend tests: host pools, storage configs, the backend
created by SGLang's storage backend factory, and an engine process's part (a spawned child).

`host_pool(kind, layout)` builds SGLang's `MHATokenToKVPoolHost` / `MLATokenToKVPoolHost` over CPU
device tensors described by SGLang's own `MHABufferInfo` / `MLABufferInfo` (no GPU: pinned memory
off). `backend(...)` goes through `StorageBackendFactory.create_backend("dynamic", ...)` and then
`register_mem_pool_host`, the two calls SGLang's cache controller makes on attach.
"""

from __future__ import annotations

import warnings

import torch

warnings.simplefilter("ignore")  # SGLang warns at import about GPU-only features

from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo, MLABufferInfo  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402

LAYERS, HEADS, HEAD_DIM, PAGE, DEVICE_TOKENS = 2, 2, 8, 4, 64
MHA_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")
MLA_LAYOUTS = ("layer_first", "page_first", "page_first_direct")
MLA_LORA_RANK, MLA_ROPE_DIM = 16, 8
BACKEND = {"backend_name": "kvbm_shm", "module_path": "kvbm_shm.integrations.sglang",
           "class_name": "KvbmShmStorage", "interface_v1": 1}


def _ptrs(tensors) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.uint64)


def host_pool(layout: str, dtype=torch.float32) -> MHATokenToKVPoolHost:
    k = tuple(torch.zeros(DEVICE_TOKENS, HEADS, HEAD_DIM, dtype=dtype) for _ in range(LAYERS))
    v = tuple(torch.zeros(DEVICE_TOKENS, HEADS, HEAD_DIM, dtype=dtype) for _ in range(LAYERS))
    info = MHABufferInfo(buffers=KVBuffers(k=k, v=v, k_data_ptrs=_ptrs(k), v_data_ptrs=_ptrs(v),
                                           layout=KVBufferLayout.NHD),
                         page_size=PAGE, head_num=HEADS, head_dim=HEAD_DIM, v_head_dim=HEAD_DIM, dtype=dtype,
                         device=torch.device("cpu"))
    pool = MHATokenToKVPoolHost(info, 2.0, 0, PAGE, layout, pin_memory=False, device="cpu",
                                device_capacity_tokens=DEVICE_TOKENS, start_layer=0, end_layer=LAYERS)
    pool.device_k, pool.device_v = k, v  # keep the device tensors alive with the pool
    return pool


def mla_host_pool(layout: str, dtype=torch.float32) -> MLATokenToKVPoolHost:
    dim = MLA_LORA_RANK + MLA_ROPE_DIM
    rows = tuple(torch.zeros(DEVICE_TOKENS, 1, dim, dtype=dtype) for _ in range(LAYERS))
    info = MLABufferInfo(buffers=rows, data_ptrs=_ptrs(rows), layer_indices=tuple(range(LAYERS)),
                         device_layer_num=LAYERS, page_size=PAGE, kv_lora_rank=MLA_LORA_RANK,
                         qk_rope_head_dim=MLA_ROPE_DIM, kv_cache_dim=dim, dtype=dtype, device=torch.device("cpu"))
    pool = MLATokenToKVPoolHost(info, 2.0, 0, PAGE, layout, pin_memory=False, device="cpu",
                                device_capacity_tokens=DEVICE_TOKENS, start_layer=0, end_layer=LAYERS,
                                target_layer_num=LAYERS)
    pool.device_rows = rows
    return pool


def storage_config(instance: str, runtime_dir, model: str = "tiny-model", tp_rank: int = 0, tp_size: int = 1,
                   is_mla: bool = False, **extra) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=is_mla, enable_storage_metrics=False, is_page_first_layout=False, model_name=model,
        extra_config={**BACKEND, "instance": instance, "runtime_dir": str(runtime_dir), "cache_gb": 0.004, **extra})


def backend(config: HiCacheStorageConfig, pool, wait_s: float = 10.0):
    """The backend as SGLang's cache controller creates it, with its service link up (if `wait_s`)."""
    storage = StorageBackendFactory.create_backend("dynamic", config, pool)
    storage.register_mem_pool_host(pool)
    if wait_s:
        assert storage.wait_up(wait_s), "the backend's link to the service did not come up"
    return storage


def fill_pages(pool, pages: list[int], seed: int) -> None:
    """Random bytes in the given host pool pages (every token of every layer, K and V)."""
    gen = torch.Generator().manual_seed(seed)
    for p in pages:
        page = pool.get_data_page(p * PAGE, flat=True)
        pool.set_from_flat_data_page(p * PAGE, torch.randn(page.shape, generator=gen, dtype=page.dtype))


def page_bytes(pool, pages: list[int]) -> list[bytes]:
    return [pool.get_data_page(p * PAGE, flat=True).contiguous().numpy().tobytes() for p in pages]


def host_indices(pages: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in pages]).to(torch.int64)


def engine_b(instance: str, runtime_dir: str, keys: list[str], flat_keys: list[str], layouts: list[str]) -> dict:
    """Engine B, in its own process: for each layout, a fresh host pool and backend; which keys
    exist, and the bytes of the pages it loads (zero-copy into host pages 5.., and flat pages)."""
    out = {}
    for layout in layouts:
        pool = host_pool(layout)
        storage = backend(storage_config(instance, runtime_dir), pool)
        other_tp = backend(storage_config(instance, runtime_dir, tp_rank=1, tp_size=2), host_pool(layout))
        try:
            pages = list(range(5, 5 + len(keys)))
            out[layout] = {
                "exists": storage.batch_exists(keys + ["never-stored"]),
                "exists_one": [storage.exists(k) for k in (keys[0], "never-stored")],
                "get_v1": storage.batch_get_v1(keys, host_indices(pages)),
                "bytes": page_bytes(pool, pages),
                "flat": [None if t is None else t.numpy().tobytes()
                         for t in storage.batch_get(flat_keys, [pool.get_dummy_flat_data_page() for _ in flat_keys])],
                "other_tp": other_tp.batch_exists(keys),
            }
        finally:
            storage.close()
            other_tp.close()
    return out
