"""A tensor as a description: what `layout.EngineLayout.bind` needs of it (shape, byte strides,
first byte's address, dtype), built from a `protocol.TensorHandle`. Imports only the core, so
both sides may use it: workers build chunk tables from imported addresses, the coordinator
validates a registration with address 0 (it never maps engine memory).
"""

from __future__ import annotations

import dataclasses

from .. import protocol as p
from ..layout import itemsize


@dataclasses.dataclass(frozen=True)
class TensorView:
    """A tensor as `EngineLayout.bind` sees it: shape, byte strides, first byte's address, dtype."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]  # bytes
    address: int
    dtype: str

    @classmethod
    def of(cls, handle: p.TensorHandle, address: int) -> "TensorView":
        return cls(tuple(handle.shape), tuple(handle.strides), address, handle.dtype)

    def element_size(self) -> int:
        return itemsize(self.dtype)

    def stride(self) -> tuple[int, ...]:
        return tuple(s // self.element_size() for s in self.strides)

    def data_ptr(self) -> int:
        return self.address
