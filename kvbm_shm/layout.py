"""KV geometry, how an engine's tensors hold blocks, and views of blocks.

Primitives:
- `KvLayout`: the geometry of one block (layers, K/V outer dim, tokens per block, inner dim,
  dtype); `block_bytes` is the size of a block in every tier.
- `TensorSpec` / `EngineLayout`: how an engine's own KV tensors hold blocks. Each tensor has a
  block axis; the axes before it are "outer" splits (e.g. K/V on axis 0 of a CUDA flash-attn
  tensor, or layers), the axes after it must be contiguous. A block of such a tensor is therefore
  `prod(outer)` contiguous chunks. The layout is described, not assumed:
    vLLM CPU backend, per layer  (num_blocks, kv_heads, block_size, 2*head)  block_axis=0
    K and V as separate tensors  [k0, v0, k1, v1, ...] each (num_blocks, ...)  block_axis=0
    K/V split on an outer axis   (2, num_blocks, block_size, kv_heads, head)  block_axis=1
    one tensor for all layers    (num_layers, 2, num_blocks, ...)             block_axis=2
- The G2/G3 block format: the chunks of every tensor, tensor by tensor, outer index in row-major
  order, back to back. So a store or load is one contiguous copy per (tensor, outer, block).
- `Namespace`: model fingerprint + geometry + engine layout + tensor-parallel rank/size. Blocks
  of different namespaces never match; `Namespace.fingerprint` is the stable identity.
- `ChunkTable` (from `EngineLayout.bind(tensors)`): the byte addresses the copy engines need.

The wire-facing structs are msgspec Structs so that the protocol can carry them as they are.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import msgspec
import numpy as np
import xxhash

_ITEMSIZE = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "uint8": 1, "int8": 1, "float64": 8,
}


def dtype_name(dtype) -> str:
    """'float32' for torch.float32, numpy float32 or the string itself."""
    name = str(dtype).removeprefix("torch.")
    if name not in _ITEMSIZE:
        raise ValueError(f"unsupported KV dtype {dtype!r}; supported: {', '.join(sorted(_ITEMSIZE))}")
    return name


def itemsize(dtype: str) -> int:
    return _ITEMSIZE[dtype_name(dtype)]


class KvLayout(msgspec.Struct, frozen=True):
    """Geometry of one KV block of one tensor-parallel shard."""

    num_layers: int
    outer_dim: int  # 2 for separate K and V, 1 for MLA
    page_size: int  # tokens per block
    inner_dim: int  # kv heads x head dim of this shard
    dtype: str

    @property
    def block_bytes(self) -> int:
        return self.num_layers * self.outer_dim * self.page_size * self.inner_dim * itemsize(self.dtype)

    def validate(self) -> None:
        for name in ("num_layers", "outer_dim", "page_size", "inner_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        dtype_name(self.dtype)


class TensorSpec(msgspec.Struct, frozen=True):
    """One engine tensor: its shape with the block axis left out, where that axis sits, dtype."""

    block_shape: tuple[int, ...]
    block_axis: int
    dtype: str

    @property
    def num_chunks(self) -> int:
        return math.prod(self.block_shape[: self.block_axis])

    @property
    def chunk_bytes(self) -> int:
        return math.prod(self.block_shape[self.block_axis:]) * itemsize(self.dtype)


class EngineLayout(msgspec.Struct, frozen=True):
    """How an engine's KV tensors hold blocks (see the module docstring)."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, tensors: Sequence, block_axis: int = 0) -> "EngineLayout":
        """Describe engine tensors (torch or numpy) that all keep blocks on `block_axis`."""
        specs = []
        for t in tensors:
            shape = tuple(int(s) for s in t.shape)
            if not 0 <= block_axis < len(shape):
                raise ValueError(f"block_axis {block_axis} out of range for shape {shape}")
            specs.append(TensorSpec(shape[:block_axis] + shape[block_axis + 1:], block_axis, dtype_name(t.dtype)))
        return cls(tuple(specs))

    @property
    def block_bytes(self) -> int:
        return sum(t.num_chunks * t.chunk_bytes for t in self.tensors)

    def bind(self, tensors: Sequence) -> "ChunkTable":
        """Check `tensors` against this layout and compute the copy addresses.

        Raises ValueError when a tensor has another shape or dtype, or its per-block part is
        not contiguous (the copy engines move whole contiguous chunks).
        """
        if len(tensors) != len(self.tensors):
            raise ValueError(f"layout has {len(self.tensors)} tensors, got {len(tensors)}")
        src_offset, src_stride, size, dst_offset, base = [], [], [], [], []
        num_blocks = None
        g2 = 0
        for i, (t, spec) in enumerate(zip(tensors, self.tensors)):
            shape, strides, ptr, item = _geometry(t)
            ax = spec.block_axis
            if dtype_name(t.dtype) != spec.dtype or shape[:ax] + shape[ax + 1:] != spec.block_shape:
                raise ValueError(
                    f"tensor {i}: shape {shape} {t.dtype} does not match layout "
                    f"{spec.block_shape} {spec.dtype} (block axis {ax})")
            if num_blocks is None:
                num_blocks = shape[ax]
            elif shape[ax] != num_blocks:
                raise ValueError(f"tensor {i} holds {shape[ax]} blocks, tensor 0 holds {num_blocks}")
            expect = item
            for d in range(len(shape) - 1, ax, -1):
                if shape[d] != 1 and strides[d] != expect:
                    raise ValueError(f"tensor {i}: the part of a block after axis {ax} is not contiguous")
                expect *= shape[d]
            for outer in np.ndindex(*shape[:ax]):
                src_offset.append(sum(o * s for o, s in zip(outer, strides[:ax])))
                src_stride.append(strides[ax])
                size.append(spec.chunk_bytes)
                dst_offset.append(g2)
                base.append(ptr)
                g2 += spec.chunk_bytes
        return ChunkTable(
            base=np.asarray(base, np.uint64),
            src_offset=np.asarray(src_offset, np.uint64),
            src_block_stride=np.asarray(src_stride, np.uint64),
            chunk_bytes=np.asarray(size, np.uint64),
            dst_offset=np.asarray(dst_offset, np.uint64),
            num_device_blocks=int(num_blocks or 0),
            block_bytes=g2,
        )


@dataclasses.dataclass(frozen=True)
class ChunkTable:
    """Byte addresses of every chunk of a block in an engine's tensors and in a G2 block.

    Chunk k of device block b lives at `base[k] + src_offset[k] + b * src_block_stride[k]` and
    occupies `chunk_bytes[k]` bytes at `dst_offset[k]` inside the G2 block.
    """

    base: np.ndarray
    src_offset: np.ndarray
    src_block_stride: np.ndarray
    chunk_bytes: np.ndarray
    dst_offset: np.ndarray
    num_device_blocks: int
    block_bytes: int

    def device_addresses(self, device_block_ids: np.ndarray) -> np.ndarray:
        """(num_chunks, n) addresses of every chunk of the given device blocks."""
        ids = np.asarray(device_block_ids, np.uint64)
        return (self.base + self.src_offset)[:, None] + self.src_block_stride[:, None] * ids[None, :]


class Namespace(msgspec.Struct, frozen=True):
    """What must be equal for two engines to share blocks."""

    model: str  # model fingerprint: name, revision, how it was loaded
    kv: KvLayout
    engine_layout: EngineLayout
    tp_rank: int = 0
    tp_size: int = 1

    def validate(self) -> None:
        self.kv.validate()
        if not self.model:
            raise ValueError("namespace model must not be empty")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} out of range for tp_size {self.tp_size}")
        if self.engine_layout.block_bytes != self.kv.block_bytes:
            raise ValueError(
                f"engine layout holds {self.engine_layout.block_bytes} bytes per block, "
                f"geometry says {self.kv.block_bytes}")

    @property
    def fingerprint(self) -> str:
        """32 hex digits identifying this namespace across processes, hosts and restarts."""
        return xxhash.xxh3_128_hexdigest(msgspec.msgpack.encode(self))


def _geometry(t) -> tuple[tuple[int, ...], tuple[int, ...], int, int]:
    """shape, byte strides, data pointer and itemsize of a torch tensor or numpy array."""
    if isinstance(t, np.ndarray):
        return tuple(t.shape), tuple(t.strides), t.ctypes.data, t.itemsize
    item = t.element_size()
    return tuple(t.shape), tuple(s * item for s in t.stride()), t.data_ptr(), item
