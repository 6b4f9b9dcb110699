"""GPU copy engine: gather/scatter of KV block chunks between device tensors and pinned host blocks.

Runs in transfer workers and the benchmark: one `CudaCopyEngine` per GPU and process. Both paths
move the same regions, the `(device address, host address, size)` triples of
`cpu_copy.copy_plan` (chunks of consecutive blocks that are contiguous on both sides merged):

- "kernel": one launch of a CUDA C kernel compiled at run time with NVRTC: a thread block per
  region (sliced further for large regions), 16-byte vector loads and stores, 4 in flight per
  thread, a byte loop for what is left (regions of any size and alignment); the GPU reads or
  writes the page-locked host memory directly (DEVICEMAP). The cost per region is a few bytes of
  table, so it suits many small chunks. If the kernel cannot be built or loaded here (no NVRTC,
  an NVRTC the bindings cannot dlopen, a driver that rejects the image), the engine says so in
  one log line and every copy takes the DMA path (`kernel.reason` keeps why).
- "dma": the copy engines; `cuMemcpyBatchAsync` (CUDA >= 12.8; its signature differs between
  cuda-python 12 and 13, both handled) in batches of at most `DMA_BATCH_MAX` copies, else (a
  driver or binding without it, or one that refuses a batch) a loop of `cuMemcpyAsync`. Suits
  large regions.

Each direction has its own non-blocking stream (cuMemcpyBatchAsync refuses the legacy default
stream), so an offload and an onboard overlap. `gather` (device -> host) and `scatter` (host ->
device) check the block ids and return once the bytes have arrived. `path="auto"` picks the
faster path for the mean region size of the transfer from `calibrate()`, a measurement on this
GPU made once, lazily, and never repeated (if it fails, auto means DMA); its numbers are kept in
`calibration` (GB/s per direction, region size and path) and logged.
Host addresses must lie in a `HostRegistration` given to `add_host_memory`: every region, start
to end, inside one registered range, or nothing is launched or enqueued, on either path.

Pure pieces, usable without a GPU: `dma_batches`, `host_to_device`, `check_blocks`, `pick_path`,
`LoadOnce`, `compile_cubin` (NVRTC alone).
"""

from __future__ import annotations

import ctypes
import logging
import math
import time
from typing import Callable

import numpy as np

from ..errors import DeviceError, RequestError
from ..layout import ChunkTable
from . import cpu_copy
from .cuda_driver import check, device_attribute, driver, nvrtc, use_device
from .host_register import HostRegistration

log = logging.getLogger(__name__)

PATHS = ("kernel", "dma")
DMA_BATCH_MAX = 4096  # copies per cuMemcpyBatchAsync call: a driver may cap a batch
_BATCH_FALLBACK_ERRORS = ("NOT_SUPPORTED", "NOT_FOUND", "INVALID_VALUE")  # old driver, or a refused batch
_THREADS = 256
_BYTES_PER_THREAD_PASS = 16 * 4  # four 16-byte vectors in flight per thread
_MAX_SLICES = 64
_CALIBRATION_SIZES = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20)

KERNEL_NAME = "kvbm_copy_regions"
KERNEL_SOURCE = r"""
// Copy num_regions regions: region r is sizes[r] bytes from srcs[r] to dsts[r].
// blockIdx.x walks the regions, blockIdx.y slices a region across several blocks.
// No #include: NVRTC has no <cstdint>; uint4 is a built-in vector type.
extern "C" __global__ void kvbm_copy_regions(
        const unsigned long long* __restrict__ srcs,
        const unsigned long long* __restrict__ dsts,
        const unsigned long long* __restrict__ sizes,
        unsigned int num_regions) {
    const unsigned long long lane = (unsigned long long)blockIdx.y * blockDim.x + threadIdx.x;
    const unsigned long long lanes = (unsigned long long)gridDim.y * blockDim.x;
    for (unsigned int r = blockIdx.x; r < num_regions; r += gridDim.x) {
        const char* src = (const char*)srcs[r];
        char* dst = (char*)dsts[r];
        const unsigned long long n = sizes[r];
        unsigned long long vec_bytes = 0;
        if ((((unsigned long long)src | (unsigned long long)dst) & 15ull) == 0ull) {
            const uint4* s = (const uint4*)src;
            uint4* d = (uint4*)dst;
            const unsigned long long n16 = n >> 4;
            unsigned long long i = lane;
            for (; i + 3 * lanes < n16; i += 4 * lanes) {
                const uint4 a = s[i];
                const uint4 b = s[i + lanes];
                const uint4 c = s[i + 2 * lanes];
                const uint4 e = s[i + 3 * lanes];
                d[i] = a;
                d[i + lanes] = b;
                d[i + 2 * lanes] = c;
                d[i + 3 * lanes] = e;
            }
            for (; i < n16; i += lanes) {
                d[i] = s[i];
            }
            vec_bytes = n16 << 4;
        }
        for (unsigned long long i = vec_bytes + lane; i < n; i += lanes) {
            dst[i] = src[i];
        }
    }
}
"""


# ---------------------------------------------------------------- pure pieces (no GPU)


def dma_batches(count: int, limit: int = DMA_BATCH_MAX) -> list[tuple[int, int]]:
    """[lo, hi) index ranges that cover `count` copies, each at most `limit` long."""
    return [(lo, min(lo + limit, count)) for lo in range(0, count, limit)]


def host_to_device(host: np.ndarray, size: np.ndarray, ranges) -> np.ndarray:
    """Device addresses of the host regions `[host[i], host[i] + size[i])`.

    `ranges` are `(address, nbytes, device_offset)` of page-locked host memory; every region
    must lie wholly inside one of them (its start and its end), else `DeviceError` names the
    first region that does not: a kernel reading past a registration would fault and take the
    process's GPU context with it.
    """
    host = np.asarray(host, np.uint64)
    end = host + np.asarray(size, np.uint64)
    out = np.zeros(len(host), np.uint64)
    found = np.zeros(len(host), bool)
    for address, nbytes, offset in ranges:
        inside = ~found & (host >= np.uint64(address)) & (end <= np.uint64(address + nbytes)) & (end >= host)
        out[inside] = host[inside] + np.uint64(offset % (1 << 64))  # uint64 wraps: a negative offset works
        found |= inside
    if not found.all():
        i = int(np.flatnonzero(~found)[0])
        raise DeviceError(f"host memory {int(host[i]):#x}..{int(end[i]):#x} ({int(end[i] - host[i])} bytes) is not "
                          "inside memory page-locked for the GPU in this process (register the G2 segment with "
                          "HostRegistration and add it to the copy engine first)")
    return out


def check_blocks(table: ChunkTable, device_block_ids, g2_block_addrs) -> np.ndarray:
    """The device block ids as int64, after checking them against the table; `RequestError` otherwise."""
    ids = np.asarray(device_block_ids)
    if len(ids) != len(g2_block_addrs):
        raise RequestError(f"{len(ids)} device blocks but {len(g2_block_addrs)} G2 blocks")
    if len(ids) and (ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= table.num_device_blocks):
        raise RequestError(f"device block ids must be integers in [0, {table.num_device_blocks})")
    return ids.astype(np.int64)


def pick_path(by_size: dict[int, dict[str, float]], region_bytes: int) -> str:
    """The fastest path measured for the calibration size nearest (in log2) to `region_bytes`;
    "dma" when nothing was measured."""
    if not by_size:
        return "dma"
    nearest = min(by_size, key=lambda s: abs(math.log2(s) - math.log2(max(region_bytes, 1))))
    return max(by_size[nearest], key=by_size[nearest].get)


class LoadOnce:
    """Something built on first use (the copy kernel); a failure is logged once and remembered,
    never retried: `get()` then returns None and `reason` says why."""

    def __init__(self, what: str, load: Callable[[], object], instead: str):
        self.what = what
        self.instead = instead
        self.value = None
        self.reason: str | None = None
        self._load = load

    def get(self):
        if self.value is None and self.reason is None:
            try:
                self.value = self._load()
            except Exception as e:  # any failure to build it (RuntimeError from a dlopen too) means: not here
                self.give_up(f"{type(e).__name__}: {str(e).strip()}")
        return self.value

    def give_up(self, reason: str) -> None:
        self.reason = reason
        log.warning("%s is unusable (%s): %s", self.what, reason, self.instead)


def compile_cubin(arch: str) -> bytes:
    """NVRTC: the copy kernel as a cubin for `arch` (e.g. "sm_90"). Needs no GPU, only libnvrtc;
    a missing libnvrtc raises RuntimeError (from the bindings), a failed compile DeviceError."""
    rtc = nvrtc()
    prog = check(rtc.nvrtcCreateProgram(KERNEL_SOURCE.encode(), b"kvbm_copy.cu", 0, [], []), "nvrtcCreateProgram")
    try:
        options = [f"--gpu-architecture={arch}".encode(), b"--std=c++17"]
        (err,) = rtc.nvrtcCompileProgram(prog, len(options), options)
        if err != rtc.nvrtcResult.NVRTC_SUCCESS:
            text = bytearray(check(rtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize"))
            check(rtc.nvrtcGetProgramLog(prog, text), "nvrtcGetProgramLog")
            raise DeviceError(f"NVRTC could not compile the copy kernel for {arch}: "
                              f"{text.rstrip(bytes(1)).decode(errors='replace')}")
        cubin = bytearray(check(rtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize"))  # NVRTC writes into it
        check(rtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    finally:
        rtc.nvrtcDestroyProgram(prog)
    return bytes(cubin)


def _load_kernel(ordinal: int):
    """Compile for this GPU's architecture, load: (module, kernel function)."""
    drv = driver()
    major, minor = (device_attribute(ordinal, f"COMPUTE_CAPABILITY_{x}") for x in ("MAJOR", "MINOR"))
    arch = f"sm_{major}{minor}"
    image = np.frombuffer(compile_cubin(arch), np.uint8)  # the driver reads the image through a pointer
    use_device(ordinal)
    module = check(drv.cuModuleLoadData(image.ctypes.data), "cuModuleLoadData")
    function = check(drv.cuModuleGetFunction(module, KERNEL_NAME.encode()), "cuModuleGetFunction")
    log.info("compiled the copy kernel for %s (GPU %d)", arch, ordinal)
    return module, function


class _PinnedTable:
    """A growable page-locked host array of uint64 the kernel reads its region table from."""

    def __init__(self):
        self.address = 0
        self.device_address = 0
        self.capacity = 0
        self.array: np.ndarray | None = None

    def fill(self, *columns: np.ndarray) -> list[int]:
        """Write the columns back to back; returns each column's device address."""
        n = len(columns[0])
        need = n * len(columns)
        if need > self.capacity:
            self.close()
            capacity = max(need, 4096)
            self.address = int(check(driver().cuMemAllocHost(capacity * 8), "cuMemAllocHost"))
            self.device_address = int(check(driver().cuMemHostGetDevicePointer(self.address, 0),
                                            "cuMemHostGetDevicePointer"))
            self.capacity = capacity
            self.array = np.ctypeslib.as_array((ctypes.c_uint64 * capacity).from_address(self.address))
        for i, column in enumerate(columns):
            self.array[i * n:(i + 1) * n] = column
        return [self.device_address + i * n * 8 for i in range(len(columns))]

    def close(self) -> None:
        if self.address:
            self.array = None
            check(driver().cuMemFreeHost(self.address), "cuMemFreeHost")
            self.address = self.device_address = self.capacity = 0


class _Direction:
    """A stream and a region table for one direction of copies."""

    def __init__(self, name: str):
        drv = driver()
        self.name = name
        self.stream = check(drv.cuStreamCreate(int(drv.CUstream_flags.CU_STREAM_NON_BLOCKING)), "cuStreamCreate")
        self.table = _PinnedTable()

    def close(self) -> None:
        self.table.close()
        check(driver().cuStreamDestroy(self.stream), "cuStreamDestroy")


class CudaCopyEngine:
    def __init__(self, ordinal: int, path: str = "auto"):
        if path not in (*PATHS, "auto"):
            raise ValueError(f"copy path must be one of {PATHS} or 'auto', got {path!r}")
        self.ordinal = ordinal
        self.path = path
        use_device(ordinal)
        self._d2h = _Direction("d2h")
        self._h2d = _Direction("h2d")
        self._host: list[HostRegistration] = []
        self.kernel = LoadOnce(f"the GPU {ordinal} copy kernel", lambda: _load_kernel(ordinal),
                               "GPU copies take the DMA path")
        self.dma_batch = hasattr(driver(), "cuMemcpyBatchAsync")  # else a loop of cuMemcpyAsync
        self.calibration: dict[str, dict[int, dict[str, float]]] | None = None  # None: not measured yet

    # ------------------------------------------------------------ host memory

    def add_host_memory(self, registration: HostRegistration) -> None:
        self._host.append(registration)

    def remove_host_memory(self, registration: HostRegistration) -> None:
        self._host.remove(registration)

    # ------------------------------------------------------------ transfers

    def gather(self, table: ChunkTable, device_block_ids, g2_block_addrs, path: str | None = None) -> int:
        """Device blocks -> G2 blocks (same order). Returns bytes copied, once they are there."""
        ids = check_blocks(table, device_block_ids, g2_block_addrs)
        dev, host, size, _ = cpu_copy.copy_plan(table, ids, g2_block_addrs)
        self.copy(True, dev, host, size, path)
        return int(size.sum())

    def scatter(self, table: ChunkTable, device_block_ids, g2_block_addrs, path: str | None = None) -> int:
        """G2 blocks -> device blocks (same order). Returns bytes copied, once they are there."""
        ids = check_blocks(table, device_block_ids, g2_block_addrs)
        dev, host, size, _ = cpu_copy.copy_plan(table, ids, g2_block_addrs)
        self.copy(False, dev, host, size, path)
        return int(size.sum())

    def copy(self, to_host: bool, dev: np.ndarray, host: np.ndarray, size: np.ndarray,
             path: str | None = None) -> str:
        """Copy regions between device and host addresses on the direction's stream; returns the
        path used."""
        if not len(size):
            return "none"
        use_device(self.ordinal)
        direction = self._d2h if to_host else self._h2d
        path = path or self.path
        if path != "dma" and self.kernel.get() is None:
            path = "dma"
        elif path == "auto":
            path = self.choose(to_host, int(size.sum()) // len(size))
        host_dev = host_to_device(host, size, [(r.address, r.size, r.device_offset) for r in self._host])
        if path == "kernel":
            src, dst = (dev, host_dev) if to_host else (host_dev, dev)
            self._launch(direction, src, dst, size)
        else:
            src, dst = (dev, host) if to_host else (host, dev)
            self._dma(direction, src, dst, size)
        check(driver().cuStreamSynchronize(direction.stream), "cuStreamSynchronize")
        return path

    def choose(self, to_host: bool, region_bytes: int) -> str:
        """The faster path for regions of this size, from the calibration (measured on first use,
        once: if it fails, DMA)."""
        if self.calibration is None:
            try:
                self.calibrate()
            except DeviceError as e:
                self.calibration = {}
                log.warning("GPU %d: calibrating the copy paths failed (%s): auto copies take the DMA path",
                            self.ordinal, e)
        return pick_path(self.calibration.get("d2h" if to_host else "h2d", {}), region_bytes)

    # ------------------------------------------------------------ calibration

    def calibrate(self, total_bytes: int = 32 << 20, repeats: int = 3) -> dict:
        """Measure the usable paths, both directions, over `_CALIBRATION_SIZES`; GB/s in `calibration`."""
        drv = driver()
        use_device(self.ordinal)
        paths = [p for p in PATHS if p != "kernel" or self.kernel.get() is not None]
        dev = int(check(drv.cuMemAlloc(total_bytes), "cuMemAlloc"))
        try:
            host = int(check(drv.cuMemAllocHost(total_bytes), "cuMemAllocHost"))
        except BaseException:
            drv.cuMemFree(dev)
            raise
        registration = _AllocHostRegistration(host, total_bytes, self.ordinal)
        self._host.append(registration)
        try:
            result: dict[str, dict[int, dict[str, float]]] = {"d2h": {}, "h2d": {}}
            for region in _CALIBRATION_SIZES:
                n = total_bytes // region
                offsets = np.arange(n, dtype=np.uint64) * np.uint64(region)
                size = np.full(n, region, np.uint64)
                for name, to_host in (("d2h", True), ("h2d", False)):
                    result[name][region] = {}
                    for path in paths:
                        best = math.inf
                        for _ in range(repeats + 1):  # the first run warms up
                            t0 = time.perf_counter()
                            self.copy(to_host, dev + offsets, host + offsets, size, path)
                            best = min(best, time.perf_counter() - t0)
                        result[name][region][path] = round(n * region / best / 1e9, 2)
            self.calibration = result
            log.info("GPU %d copy paths (GB/s by direction, region bytes, path): %s", self.ordinal, result)
            return result
        finally:
            self._host.remove(registration)
            check(drv.cuMemFreeHost(host), "cuMemFreeHost")
            check(drv.cuMemFree(dev), "cuMemFree")

    # ------------------------------------------------------------ paths

    def _launch(self, direction: _Direction, src: np.ndarray, dst: np.ndarray, size: np.ndarray) -> None:
        _, function = self.kernel.get()
        n = len(size)
        src_at, dst_at, size_at = direction.table.fill(src, dst, size)
        # kernelParams: an array of pointers to the argument values (scalars as numpy)
        values = np.array([src_at, dst_at, size_at], np.uint64)
        count = np.array([n], np.uint32)
        params = np.array([values.ctypes.data, values.ctypes.data + 8, values.ctypes.data + 16, count.ctypes.data],
                          np.uint64)
        slices = min(max(1, -(-int(size.max()) // (_THREADS * _BYTES_PER_THREAD_PASS))), _MAX_SLICES)
        grid_x = min(n, 1 << 20)
        check(driver().cuLaunchKernel(function, grid_x, slices, 1, _THREADS, 1, 1, 0, direction.stream,
                                      params.ctypes.data, 0), "cuLaunchKernel")

    def _dma(self, direction: _Direction, src: np.ndarray, dst: np.ndarray, size: np.ndarray) -> None:
        drv = driver()
        done = 0  # copies enqueued by batches
        if self.dma_batch and len(size) > 1:
            for lo, hi in dma_batches(len(size)):
                try:
                    self._batch(direction, src[lo:hi], dst[lo:hi], size[lo:hi])
                except (TypeError, AttributeError) as e:  # a cuda-python without the CUDA 12/13 forms we know
                    self._batch_unusable(e)
                    break
                except DeviceError as e:  # a driver older than 12.8, or one that refuses the batch
                    if not any(code in str(e) for code in _BATCH_FALLBACK_ERRORS):
                        raise
                    self._batch_unusable(e)
                    break
                done = hi
        for d, s, n in zip(dst[done:].tolist(), src[done:].tolist(), size[done:].tolist()):
            check(drv.cuMemcpyAsync(d, s, n, direction.stream), "cuMemcpyAsync")

    def _batch(self, direction: _Direction, src: np.ndarray, dst: np.ndarray, size: np.ndarray) -> None:
        drv = driver()
        attr = drv.CUmemcpyAttributes()
        attr.srcAccessOrder = drv.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
        attr.flags = int(drv.CUmemcpyFlags.CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE)
        dsts = [drv.CUdeviceptr(a) for a in dst.tolist()]
        srcs = [drv.CUdeviceptr(a) for a in src.tolist()]
        # cuda-python 12.8/12.9 returns (err, failIdx); 13.x returns (err,): check() takes both
        check(drv.cuMemcpyBatchAsync(dsts, srcs, size.tolist(), len(dsts), [attr], [0], 1, direction.stream),
              "cuMemcpyBatchAsync")

    def _batch_unusable(self, error: Exception) -> None:
        log.warning("cuMemcpyBatchAsync unusable here (%s): DMA falls back to a loop of cuMemcpyAsync", error)
        self.dma_batch = False

    def close(self) -> None:
        use_device(self.ordinal)
        self._d2h.close()
        self._h2d.close()
        if self.kernel.value is not None:
            check(driver().cuModuleUnload(self.kernel.value[0]), "cuModuleUnload")
            self.kernel.value = None


class _AllocHostRegistration(HostRegistration):
    """cuMemAllocHost memory: already page-locked and mapped; only the translation is needed."""

    def __init__(self, address: int, size: int, ordinal: int):
        self.address = address
        self.size = size
        self.ordinal = ordinal
        self._device_base = int(check(driver().cuMemHostGetDevicePointer(address, 0), "cuMemHostGetDevicePointer"))
        self._open = False
