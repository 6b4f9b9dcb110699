"""CUDA IPC of device memory: legacy handles (cudaMalloc memory) and VMM file descriptors.

Engines export (`export_*`), transfer workers import (`open_*`); `device.ipc` turns the results
into protocol handles. Every function needs a GPU and raises `DeviceError` otherwise.

- `memory_kind(address)`: "legacy" for cudaMalloc memory (PyTorch's default caching allocator),
  "vmm" for cuMemCreate memory (PyTorch `expandable_segments`, vLLM's sleep-mode allocator).
  Anything else (stream-ordered pools, managed memory) raises, naming what the tensor needs.
- `export_legacy(address)` -> `LegacyExport`: the legacy handle works only on an allocation's
  base, so the handle is of the base (cuMemGetAddressRange) and the tensor is `offset` bytes in.
  `open_legacy(uuid, handle)` -> base address in this process; `close_legacy(base)`.
  A process opens each handle once (`device.ipc.HandleCache` keeps it).
- `export_vmm(address, nbytes)` -> `VmmExport`: one POSIX file descriptor per physical
  allocation mapped under the tensor (expandable segments map many), with its place in the
  range. It needs allocations created with the POSIX fd handle type (alone or combined, e.g.
  POSIX_FD|FABRIC); `handle_types(props)` reads the raw bit mask (the bindings' enum cannot hold a
  combination) and `vmm_share_problem(mask)` says what is wrong otherwise (FABRIC-only memory, as
  recent PyTorch expandable segments may create, is named as such).
  `open_vmm(uuid, pieces, fds)` -> `VmmMapping`: reserves a range, maps every piece at its place,
  grants this device read-write access; `close()` unmaps and frees the range.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os

from ..errors import DeviceError
from ..kernels.cuda_driver import check, device_by_uuid, device_of, device_uuid, driver, use_device

IPC_HANDLE_BYTES = 64


@dataclasses.dataclass(frozen=True)
class LegacyExport:
    device_uuid: bytes
    handle: bytes
    alloc_bytes: int
    offset: int


@dataclasses.dataclass(frozen=True)
class VmmExport:
    device_uuid: bytes
    pieces: list[tuple[int, int]]  # (offset in the range, size) of each physical allocation
    fds: list[int]  # one per piece; the exporter owns them until it hands them to an FdServer
    offset: int  # the tensor's first byte, from the start of the first piece


def memory_kind(address: int) -> str:
    drv = driver()
    use_device(device_of(address))
    attr = drv.CUpointer_attribute.CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE
    if check(drv.cuPointerGetAttribute(attr, address), "cuPointerGetAttribute(IS_LEGACY_CUDA_IPC_CAPABLE)"):
        return "legacy"
    err, handle = drv.cuMemRetainAllocationHandle(address)
    if err == drv.CUresult.CUDA_SUCCESS:
        check(drv.cuMemRelease(handle), "cuMemRelease")
        return "vmm"
    raise DeviceError(
        f"device memory at {address:#x} is neither cudaMalloc memory (legacy CUDA IPC) nor cuMemCreate "
        "memory (VMM fd export); stream-ordered pools (cudaMallocAsync) and managed memory cannot be shared "
        "with a transfer worker: allocate the KV cache with PyTorch's default or expandable-segments "
        "allocator, or use engine-driven mode")


def export_legacy(address: int) -> LegacyExport:
    drv = driver()
    ordinal = device_of(address)
    use_device(ordinal)
    base, size = check(drv.cuMemGetAddressRange(address), "cuMemGetAddressRange")
    handle = check(drv.cuIpcGetMemHandle(base), "cuIpcGetMemHandle")
    data = ctypes.string_at(handle.getPtr(), IPC_HANDLE_BYTES)
    return LegacyExport(device_uuid(ordinal), data, int(size), address - int(base))


def open_legacy(uuid: bytes, handle: bytes) -> int:
    drv = driver()
    if len(handle) != IPC_HANDLE_BYTES:
        raise DeviceError(f"a CUDA IPC handle is {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
    use_device(device_by_uuid(uuid))
    ipc = drv.CUipcMemHandle()
    ctypes.memmove(ipc.getPtr(), handle, IPC_HANDLE_BYTES)
    flags = int(drv.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
    return int(check(drv.cuIpcOpenMemHandle(ipc, flags), "cuIpcOpenMemHandle"))


def close_legacy(base: int) -> None:
    check(driver().cuIpcCloseMemHandle(base), "cuIpcCloseMemHandle")


# CUmemAllocationProp in C: CUmemAllocationType type; CUmemAllocationHandleType requestedHandleTypes; ...
_REQUESTED_HANDLE_TYPES_OFFSET = 4
HANDLE_TYPE_POSIX_FD = 0x1  # CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
HANDLE_TYPE_FABRIC = 0x8  # CU_MEM_HANDLE_TYPE_FABRIC


def handle_types(props) -> int:
    """`requestedHandleTypes` of a `CUmemAllocationProp` as the raw bit mask. The bindings'
    attribute converts to an enum and raises ValueError for combinations (POSIX_FD|FABRIC = 9)."""
    return ctypes.c_uint32.from_address(int(props.getPtr()) + _REQUESTED_HANDLE_TYPES_OFFSET).value


def vmm_share_problem(mask: int) -> str | None:
    """Why memory with these requested handle types cannot be exported as a POSIX fd; None if it can."""
    if mask & HANDLE_TYPE_POSIX_FD:
        return None
    if mask & HANDLE_TYPE_FABRIC:
        return (f"was created with the FABRIC handle type only (requestedHandleTypes={mask:#x}), which "
                "exports a fabric handle for multi-node NVLink, not the POSIX file descriptor this tier shares VMM "
                "memory by (recent PyTorch expandable segments try FABRIC first where the driver offers it); "
                "allocate it with "
                "CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR (alone or with FABRIC), or use engine-driven mode")
    return (f"was created without a shareable handle type (requestedHandleTypes={mask:#x}), so it can be shared "
            "neither by legacy CUDA IPC (cudaMalloc memory only) nor by VMM fd export (needs "
            "CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, as PyTorch's expandable segments set it); allocate it "
            "so, or use engine-driven mode")


def export_vmm(address: int, nbytes: int) -> VmmExport:
    drv = driver()
    ordinal = device_of(address)
    use_device(ordinal)
    fd_type = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    pieces, fds = [], []
    first = None
    at, end = address, address + max(nbytes, 1)
    try:
        while at < end:
            base, size = (int(v) for v in check(drv.cuMemGetAddressRange(at), "cuMemGetAddressRange"))
            handle = check(drv.cuMemRetainAllocationHandle(at), "cuMemRetainAllocationHandle")
            try:
                props = check(drv.cuMemGetAllocationPropertiesFromHandle(handle),
                              "cuMemGetAllocationPropertiesFromHandle")
                problem = vmm_share_problem(handle_types(props))
                if problem:
                    raise DeviceError(f"VMM memory at {at:#x} {problem}")
                fds.append(int(check(drv.cuMemExportToShareableHandle(handle, fd_type, 0),
                                     "cuMemExportToShareableHandle")))
            finally:
                check(drv.cuMemRelease(handle), "cuMemRelease")
            first = base if first is None else first
            pieces.append((base - first, size))
            at = base + size
    except BaseException:
        _close_fds(fds)
        raise
    return VmmExport(device_uuid(ordinal), pieces, fds, address - first)


class VmmMapping:
    """Imported VMM pieces mapped back to back at `address` in this process."""

    def __init__(self, address: int, size: int, reserved: int):
        self.address = address
        self.size = size
        self._reserved = reserved

    def close(self) -> None:
        drv = driver()
        check(drv.cuMemUnmap(self.address, self.size), "cuMemUnmap")
        check(drv.cuMemAddressFree(self.address, self._reserved), "cuMemAddressFree")


def open_vmm(uuid: bytes, pieces: list[tuple[int, int]], fds: list[int]) -> VmmMapping:
    """Map the pieces; the fds are consumed (closed) whether this succeeds or not."""
    drv = driver()
    try:
        if len(pieces) != len(fds) or not pieces:
            raise DeviceError(f"{len(pieces)} VMM pieces but {len(fds)} file descriptors")
        ordinal = device_by_uuid(uuid)
        use_device(ordinal)
        prop = drv.CUmemAllocationProp()
        prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = ordinal
        gran = int(check(drv.cuMemGetAllocationGranularity(
            prop, drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            "cuMemGetAllocationGranularity"))
        size = max(off + n for off, n in pieces)
        reserved = -(-size // gran) * gran
        va = int(check(drv.cuMemAddressReserve(reserved, gran, 0, 0), "cuMemAddressReserve"))
        mapped: list[tuple[int, int]] = []
        fd_type = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        try:
            for (off, n), fd in zip(pieces, fds):
                handle = check(drv.cuMemImportFromShareableHandle(fd, fd_type), "cuMemImportFromShareableHandle")
                try:
                    check(drv.cuMemMap(va + off, n, 0, handle, 0), "cuMemMap")
                finally:
                    check(drv.cuMemRelease(handle), "cuMemRelease")  # the mapping keeps the memory
                mapped.append((off, n))
            access = drv.CUmemAccessDesc()
            access.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            access.location.id = ordinal
            access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            check(drv.cuMemSetAccess(va, size, [access], 1), "cuMemSetAccess")
        except BaseException:
            for off, n in mapped:
                drv.cuMemUnmap(va + off, n)
            drv.cuMemAddressFree(va, reserved)
            raise
        return VmmMapping(va, size, reserved)
    finally:
        _close_fds(fds)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
