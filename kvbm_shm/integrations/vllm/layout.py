"""What a vLLM engine's KV cache looks like to kvbm-shm: its namespace and its tensors.

Runs in both vLLM roles: the scheduler side needs the namespace to find the pool before any
tensor exists, the worker side binds the real tensors to it. Both derive it from the same
`KVCacheConfig`, so they name the same pool.

vLLM 0.32 hands connectors one 4D view `[B, H, N, C]` per layer (blocks, KV heads, tokens, K and
V side by side in C), laid out in memory in the order of the cache's `KVCacheLayout` (identity
`LBHNC` on CPU; `LBNHC`, `LHBNC` or block-outermost layouts elsewhere). kvbm-shm describes each
layer by its view permuted to that physical order, so that a block's part after the block axis
is contiguous and a store or load is one contiguous copy per (layer, block) chunk.

Primitives:
- `namespace_for(vllm_config, kv_cache_config, tp_rank, label)`: the `Namespace` of this engine
  (model fingerprint, geometry, layout, tensor-parallel shard). Raises `UnsupportedEngine` for
  caches the connector cannot serve (several KV cache groups, layers other than full attention,
  padded pages, pipeline parallelism).
- `physical_views(kv_caches, kv_cache_config)`: the engine's tensors, layer by layer in the
  group's order, permuted as the namespace describes them.
"""

from __future__ import annotations

from ...layout import EngineLayout, KvLayout, Namespace, TensorSpec, dtype_name


class UnsupportedEngine(ValueError):
    """This engine's KV cache is not one the connector can share (the message says why)."""


def _layout(kv_cache_config):
    from vllm.v1.kv_cache_layout import KVCacheLayout

    layout = kv_cache_config.kv_cache_layout
    return layout if isinstance(layout, KVCacheLayout) else KVCacheLayout[layout]


def _group(kv_cache_config):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise UnsupportedEngine(f"{len(groups)} KV cache groups; only one is supported")
    spec = groups[0].kv_cache_spec
    if not isinstance(spec, FullAttentionSpec):
        raise UnsupportedEngine(f"{type(spec).__name__} layers; only full attention is supported")
    if getattr(spec, "page_size_padded", None) is not None:
        raise UnsupportedEngine("padded KV pages are not supported")
    return groups[0]


def namespace_for(vllm_config, kv_cache_config, tp_rank: int = 0, label: str = "") -> Namespace:
    from vllm.v1.kv_cache_interface import MLAAttentionSpec, compute_layer_kv_cache_shape_bytes

    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size != 1:
        raise UnsupportedEngine("pipeline parallelism is not supported")
    group = _group(kv_cache_config)
    spec = group.kv_cache_spec
    dtype = dtype_name(spec.dtype)
    itemsize = spec.dtype.itemsize
    _, heads, tokens, content_bytes = compute_layer_kv_cache_shape_bytes(spec, 1)
    logical = (heads, tokens, content_bytes // itemsize)  # a block of one layer: [H, N, C]
    order = _layout(kv_cache_config).layer_view_order  # physical order of [B, H, N, C]
    block_axis = order.index(0)
    block_shape = tuple(logical[axis - 1] for axis in order if axis != 0)
    outer_dim = 1 if isinstance(spec, MLAAttentionSpec) else 2
    num_layers = len(group.layer_names)

    model = vllm_config.model_config
    fingerprint = "|".join([
        "vllm", str(model.model), f"revision={model.revision}", f"dtype={model.dtype}",
        f"quantization={model.quantization}", f"kv_cache_dtype={vllm_config.cache_config.cache_dtype}",
        label,
    ])
    return Namespace(
        model=fingerprint,
        kv=KvLayout(num_layers=num_layers, outer_dim=outer_dim, page_size=spec.block_size,
                    inner_dim=heads * logical[2] // outer_dim, dtype=dtype),
        engine_layout=EngineLayout(tuple(TensorSpec(block_shape, block_axis, dtype)
                                         for _ in range(num_layers))),
        tp_rank=tp_rank,
        tp_size=parallel.tensor_parallel_size,
    )


def physical_views(kv_caches: dict, kv_cache_config) -> list:
    """The layers' `[B, H, N, C]` views in the group's layer order, permuted to memory order."""
    order = _layout(kv_cache_config).layer_view_order
    return [kv_caches[name].permute(order) for name in _group(kv_cache_config).layer_names]
