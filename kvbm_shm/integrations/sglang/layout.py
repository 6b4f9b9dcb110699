"""What an SGLang HiCache host pool looks like to kvbm-shm: its namespace, its pages, its keys.

SGLang keeps host KV in one tensor per host pool (`HostKVCache.kv_buffer`), in the layout chosen
by `--hicache-mem-layout`. A HiCache storage page is `page_size` tokens of every layer; SGLang
hands a page over as its first host index (page-aligned), and its flat form
(`get_data_page(i, flat=True)`) is the buffer's slice of that page in row-major order. kvbm-shm
describes the buffer by a view with one block axis whose blocks are exactly those pages, so a
G2 block holds a page's bytes in SGLang's own flat order and a store or load is one contiguous
copy per (outer index, page):

    MHA layer_first         (2, L, size, H, D)     -> (2, L, pages, P*H*D)   block axis 2
    MHA page_first          (2, size, L, H, D)     -> (2, pages, P*L*H*D)    block axis 1
    MHA page_first_direct   (2, pages, L, P, H, D) -> (2, pages, L*P*H*D)    block axis 1
    MHA page_head           (2, pages, H, P, L, D) -> (2, pages, H*P*L*D)    block axis 1
    MLA layer_first         (L, size, 1, C)        -> (L, pages, P*C)        block axis 1
    MLA page_first          (size, L, 1, C)        -> (pages, P*L*C)         block axis 0
    MLA page_first_direct   (pages, L, P, 1, C)    -> (pages, L*P*C)         block axis 0

Primitives:
- `page_view(host_pool)`: that view of the pool's buffer, and its block axis. Raises
  `UnsupportedHostPool` for other pools and layouts (hybrid, asymmetric, page_unified, NPU).
- `namespace_for(storage_config, host_pool, label)`: the pool's `Namespace`. The model string
  names SGLang, the model, the layout, the page size and the parallel shard (pipeline stage,
  context-parallel rank); tensor parallelism goes in the namespace's tp fields. MLA KV is the
  same on every TP rank, so MLA ranks share one namespace (tp 0 of 1), as SGLang's own file
  backend shares one file per page.
- `flat_page_view(page, engine_layout)`: a flat page tensor (SGLang's non-zero-copy get/set)
  viewed as a one-block tensor of the namespace's layout.
- `page_key(salt, key)`: SGLang's page hash (a string) as a 16-byte kvbm-shm block identity:
  xxh3-128 of the namespace's fingerprint and the key, deterministic across processes and hosts.
"""

from __future__ import annotations

import xxhash

from ...layout import EngineLayout, KvLayout, Namespace, dtype_name, itemsize


class UnsupportedHostPool(ValueError):
    """This SGLang host pool is not one the backend can share (the message says why)."""


_MHA_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")
_MLA_LAYOUTS = ("layer_first", "page_first", "page_first_direct")


def _kind(host_pool) -> str:
    """'mha' or 'mla' for SGLang's plain host pools (exact classes: subclasses change the format)."""
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    if type(host_pool) is MHATokenToKVPoolHost and host_pool.layout in _MHA_LAYOUTS:
        return "mha"
    if type(host_pool) is MLATokenToKVPoolHost and host_pool.layout in _MLA_LAYOUTS:
        return "mla"
    raise UnsupportedHostPool(f"host pool {type(host_pool).__name__} with layout {host_pool.layout!r}; supported: "
                              f"MHATokenToKVPoolHost ({', '.join(_MHA_LAYOUTS)}), MLATokenToKVPoolHost "
                              f"({', '.join(_MLA_LAYOUTS)})")


def page_view(host_pool):
    """(view, block_axis): the pool's buffer with one block per HiCache page (module docstring)."""
    kind = _kind(host_pool)
    buf, layout, pages = host_pool.kv_buffer, host_pool.layout, host_pool.page_num
    if kind == "mha" and layout == "layer_first":
        view, axis = buf.reshape(2, buf.shape[1], pages, -1), 2
    elif kind == "mha":
        view, axis = buf.reshape(2, pages, -1), 1
    elif layout == "layer_first":
        view, axis = buf.reshape(buf.shape[0], pages, -1), 1
    else:
        view, axis = buf.reshape(pages, -1), 0
    if view.data_ptr() != buf.data_ptr() or not view.is_contiguous():
        raise UnsupportedHostPool(f"host pool buffer {tuple(buf.shape)} is not one contiguous tensor")
    page_bytes = host_pool.get_dummy_flat_data_page().numel() * buf.element_size()
    if view.numel() // pages * buf.element_size() != page_bytes:
        raise UnsupportedHostPool(f"a page of {tuple(buf.shape)} ({layout}) is not SGLang's flat page of "
                                  f"{page_bytes} bytes")
    return view, axis


def namespace_for(storage_config, host_pool, label: str = "") -> Namespace:
    view, axis = page_view(host_pool)
    engine_layout = EngineLayout.of([view], axis)
    dtype = dtype_name(host_pool.dtype)
    outer = 2 if _kind(host_pool) == "mha" else 1
    block_bytes = engine_layout.block_bytes
    inner = block_bytes // (host_pool.layer_num * outer * host_pool.page_size * itemsize(dtype))
    shard = [f"pp={storage_config.pp_rank}/{storage_config.pp_size}"]
    if storage_config.attn_cp_size > 1:
        shard.append(f"cp={storage_config.attn_cp_rank}/{storage_config.attn_cp_size}")
    model = "|".join(["sglang", str(storage_config.model_name or ""), f"layout={host_pool.layout}",
                      f"page_size={host_pool.page_size}", f"dtype={dtype}", *shard, label])
    shared = storage_config.is_mla_model
    return Namespace(
        model=model,
        kv=KvLayout(num_layers=host_pool.layer_num, outer_dim=outer, page_size=host_pool.page_size,
                    inner_dim=inner, dtype=dtype),
        engine_layout=engine_layout,
        tp_rank=0 if shared else storage_config.tp_rank,
        tp_size=1 if shared else storage_config.tp_size,
    )


def flat_page_view(page, engine_layout: EngineLayout):
    """A flat page (one page's bytes in SGLang's order) as a one-block tensor of `engine_layout`."""
    spec = engine_layout.tensors[0]
    shape = spec.block_shape[:spec.block_axis] + (1,) + spec.block_shape[spec.block_axis:]
    return page.reshape(shape)


def page_key(salt: bytes, key: str) -> bytes:
    return xxhash.xxh3_128_digest(salt + key.encode())
