"""Sharing an engine's KV tensors with other processes as `protocol.TensorHandle`s.

Engine side (the client library): `export_tensors(tensors)` -> (handles, `Exports`):
- a CPU tensor must live in a stand-in segment (`standin.StandInKv`): exported by segment name;
- a CUDA tensor in cudaMalloc memory: a legacy IPC handle of its allocation base plus its offset;
- a CUDA tensor in VMM memory: its allocations' POSIX fds, offered on this process's
  `FdServer` under a token. `Exports.release()` withdraws (closes) them: call it once the
  coordinator has confirmed the device is unregistered (every worker has closed its mapping).
A tensor that can be shared neither way raises `DeviceError` saying what it would need.

Worker side: `HandleCache.open(handle)` maps the memory a handle names, once per process: tensors
in the same shm segment or the same cudaMalloc allocation share one mapping (a process must not
open one legacy handle twice); `release(handle)` drops a reference and unmaps with the last.
`TensorView` (`view`, re-exported here) is the little a `layout.EngineLayout.bind` needs of a
tensor, so chunk tables can be built from imported addresses.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import numpy as np

from .. import protocol as p
from . import standin
from ..errors import DeviceError
from ..layout import dtype_name
from ..names import parse_standin_name
from ..shm import Segment
from .view import TensorView  # noqa: F401 (re-exported: workers import it from here)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- engine side


@dataclasses.dataclass
class Exports:
    """What exporting a set of tensors left open in this process (VMM fds on the FdServer)."""

    fd_tokens: list[bytes] = dataclasses.field(default_factory=list)

    def release(self) -> None:
        if self.fd_tokens:
            from .fd_passing import FdServer

            server = FdServer.shared()
            for token in self.fd_tokens:
                server.withdraw(token)
            self.fd_tokens = []


def export_tensors(tensors: Sequence) -> tuple[list[p.TensorHandle], Exports]:
    exports = Exports()
    handles = []
    try:
        for i, t in enumerate(tensors):
            shape, strides, address, item = _geometry(t)
            span = _span(shape, strides, item)
            try:
                memory = _export_memory(t, address, span, exports)
            except DeviceError as e:
                raise DeviceError(f"KV tensor {i} ({tuple(shape)} {t.dtype}): {e}") from e
            handles.append(p.TensorHandle(memory=memory, shape=list(shape), strides=list(strides),
                                          dtype=dtype_name(t.dtype)))
    except BaseException:
        exports.release()
        raise
    return handles, exports


def _export_memory(t, address: int, span: int, exports: Exports):
    if _is_cuda(t):
        from . import cuda_ipc

        if cuda_ipc.memory_kind(address) == "legacy":
            e = cuda_ipc.export_legacy(address)
            return p.CudaIpcTensor(device_uuid=e.device_uuid, handle=e.handle, alloc_bytes=e.alloc_bytes, offset=e.offset)
        from .fd_passing import FdServer

        e = cuda_ipc.export_vmm(address, span)
        server = FdServer.shared()
        token = server.offer(e.fds)
        exports.fd_tokens.append(token)
        return p.CudaVmmTensor(device_uuid=e.device_uuid, fd_socket=server.name, token=token,
                               pieces=[p.VmmPiece(offset=o, size=n) for o, n in e.pieces], offset=e.offset)
    found = standin.locate(address, span)
    if found is None:
        raise DeviceError("this CPU tensor is not in shared memory, so a transfer worker cannot reach it: "
                          "create the engine's KV with standin.StandInKv, or use engine-driven mode")
    segment, offset = found
    return p.ShmTensor(segment=segment, offset=offset)


def _is_cuda(t) -> bool:
    return getattr(getattr(t, "device", None), "type", "cpu") == "cuda"


def _geometry(t) -> tuple[tuple[int, ...], tuple[int, ...], int, int]:
    if isinstance(t, np.ndarray):
        return tuple(t.shape), tuple(t.strides), t.ctypes.data, t.itemsize
    item = t.element_size()
    return tuple(t.shape), tuple(s * item for s in t.stride()), t.data_ptr(), item


def _span(shape, strides, item: int) -> int:
    if 0 in shape:
        return 0
    return sum((n - 1) * s for n, s in zip(shape, strides)) + item


# ---------------------------------------------------------------- worker side


@dataclasses.dataclass
class _Mapping:
    base: int  # address that handle offsets count from
    on_gpu: bool
    close: Callable[[], None]
    refs: int = 0


class HandleCache:
    """Memory imported from handles, opened once per process and shared (see module docstring)."""

    def __init__(self):
        self._maps: dict[tuple, _Mapping] = {}

    def open(self, handle: p.TensorHandle) -> tuple[int, bool]:
        """(address of the tensor's first byte in this process, whether it is GPU memory)."""
        mem = handle.memory
        key = _key(mem)
        mapping = self._maps.get(key)
        if mapping is None:
            mapping = _open(mem)
            self._maps[key] = mapping
        mapping.refs += 1
        return mapping.base + mem.offset, mapping.on_gpu

    def release(self, handle: p.TensorHandle) -> None:
        key = _key(handle.memory)
        mapping = self._maps[key]
        mapping.refs -= 1
        if mapping.refs == 0:
            del self._maps[key]
            mapping.close()

    def __len__(self) -> int:
        return len(self._maps)


def _key(mem) -> tuple:
    if isinstance(mem, p.ShmTensor):
        return ("shm", mem.segment)
    if isinstance(mem, p.CudaIpcTensor):
        return ("ipc", mem.device_uuid, mem.handle)
    return ("vmm", mem.fd_socket, mem.token)


def _open(mem) -> _Mapping:
    if isinstance(mem, p.ShmTensor):
        if parse_standin_name(mem.segment) is None:
            raise DeviceError(f"{mem.segment!r} is not a stand-in device segment")
        try:
            seg = Segment.attach(mem.segment)
        except FileNotFoundError:
            raise DeviceError(f"stand-in segment {mem.segment} is gone (its engine exited?)") from None
        return _Mapping(seg.address(), False, seg.close)
    from . import cuda_ipc

    if isinstance(mem, p.CudaIpcTensor):
        base = cuda_ipc.open_legacy(mem.device_uuid, mem.handle)
        return _Mapping(base, True, lambda: cuda_ipc.close_legacy(base))
    from .fd_passing import fetch_fds

    fds = fetch_fds(mem.fd_socket, mem.token)
    mapping = cuda_ipc.open_vmm(mem.device_uuid, [(x.offset, x.size) for x in mem.pieces], fds)
    return _Mapping(mapping.address, True, mapping.close)
