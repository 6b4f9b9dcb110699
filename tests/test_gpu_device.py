"""The device tier on a GPU: CUDA IPC across processes, copy kernels against torch, end to end.

Marked `gpu`; skipped cleanly without a GPU, a driver, or a CUDA build of torch.
- legacy IPC: a tensor at an interior offset of a caching-allocator segment, exported by one
  process (handle of the allocation base + offset, device by UUID) and imported by another,
  which sees the exporter's writes, and the exporter the importer's; released, it is unmapped;
- VMM: memory from cuMemCreate (two physical allocations mapped back to back, as expandable
  segments do; the tensor at offset 0 and at an interior offset that crosses into the second
  piece) exported as POSIX fds over AF_UNIX and imported; and PyTorch's own expandable_segments
  allocations;
- the copy engine, kernel, DMA batch and DMA loop paths, equal to a torch reference on random
  data over several layouts, dtypes and block sizes (36-byte chunks too, so the kernel's byte
  loop runs), both directions; more regions than one DMA batch holds; a kernel that cannot load
  leaves every copy to DMA; calibration figures against one large copy;
- page-locking: registering from a thread with no current context, unregistering;
- end to end: engine A (GPU tensors) offloads through the transfer worker, engine B onboards;
  a G2 block that fails its checksum is skipped by the GPU onboard and reported.

torch fills tensors on its default stream and the copy engine copies on non-blocking streams of
its own, so every test synchronises the device between the two.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import threading
import time
import types

import msgspec
import numpy as np
import pytest

from kvbm_shm import protocol as p
from kvbm_shm.errors import DeviceError
from kvbm_shm.kernels import cuda_driver

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (cuda_driver.gpu_available() and torch.cuda.is_available()),
                       reason="needs a CUDA GPU, its driver and a CUDA build of torch"),
]

_ctx = mp.get_context("spawn")
_handles = msgspec.msgpack.Decoder(list[p.TensorHandle])
_NO_POSIX_FD = ("without a shareable handle type", "FABRIC handle type only")  # memory this PyTorch makes


def _pattern(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def _read_device(address: int, n: int) -> np.ndarray:
    drv = cuda_driver.driver()
    out = np.empty(n, np.uint8)
    cuda_driver.check(drv.cuMemcpyDtoH(out.ctypes.data, address, n), "cuMemcpyDtoH")
    return out


def _write_device(address: int, data: np.ndarray) -> None:
    drv = cuda_driver.driver()
    cuda_driver.check(drv.cuMemcpyHtoD(address, data.ctypes.data, data.nbytes), "cuMemcpyHtoD")
    cuda_driver.check(drv.cuCtxSynchronize(), "cuCtxSynchronize")


# ---------------------------------------------------------------- exporter processes


def _exporter(conn, kind: str, nbytes: int, offset: int) -> None:
    """Allocate, fill with pattern 1, export, then follow the parent's commands."""
    if kind == "expandable":
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    import torch

    from kvbm_shm.device.ipc import export_tensors

    try:
        if kind == "vmm":
            tensor = _vmm_tensor(nbytes, offset)
        else:
            big = torch.empty(offset + nbytes + (1 << 20), dtype=torch.uint8, device="cuda")
            tensor = big[offset:offset + nbytes]  # interior of one allocation (the view keeps it alive)
            torch.cuda.synchronize()
        _write_device(tensor.data_ptr(), _pattern(nbytes, 1))
        handles, exports = export_tensors([tensor])
        conn.send(("handles", msgspec.msgpack.encode(handles)))
        while True:
            cmd = conn.recv()
            if cmd == "write":
                _write_device(tensor.data_ptr(), _pattern(nbytes, 2))
                conn.send("written")
            elif cmd == "check":
                conn.send(bool(np.array_equal(_read_device(tensor.data_ptr(), nbytes), _pattern(nbytes, 3))))
            else:
                exports.release()
                conn.send("bye")
                return
    except Exception as e:  # report to the parent rather than dying silently
        conn.send(("error", f"{type(e).__name__}: {e}"))


class _RawCudaTensor:
    """A cuMemCreate range seen as a uint8 tensor (what device.ipc needs of a tensor)."""

    def __init__(self, address: int, nbytes: int):
        self.address, self.shape, self.dtype = address, (nbytes,), "uint8"
        self.device = types.SimpleNamespace(type="cuda")

    def data_ptr(self) -> int:
        return self.address

    def stride(self):
        return (1,)

    def element_size(self) -> int:
        return 1


def _vmm_tensor(nbytes: int, offset: int):
    """Two physical allocations (POSIX fd handle type) mapped back to back, like expandable segments;
    the tensor starts `offset` bytes into the first."""
    drv = cuda_driver.driver()
    cuda_driver.use_device(0)
    prop = drv.CUmemAllocationProp()
    prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = 0
    prop.requestedHandleTypes = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    gran = int(cuda_driver.check(drv.cuMemGetAllocationGranularity(
        prop, drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM), "granularity"))
    piece = -(-(offset + nbytes) // 2 // gran) * gran
    assert offset < piece
    va = int(cuda_driver.check(drv.cuMemAddressReserve(2 * piece, gran, 0, 0), "cuMemAddressReserve"))
    for i in range(2):
        handle = cuda_driver.check(drv.cuMemCreate(piece, prop, 0), "cuMemCreate")
        cuda_driver.check(drv.cuMemMap(va + i * piece, piece, 0, handle, 0), "cuMemMap")
        cuda_driver.check(drv.cuMemRelease(handle), "cuMemRelease")
    access = drv.CUmemAccessDesc()
    access.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    access.location.id = 0
    access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    cuda_driver.check(drv.cuMemSetAccess(va, 2 * piece, [access], 1), "cuMemSetAccess")
    return _RawCudaTensor(va + offset, nbytes)


@pytest.mark.parametrize("kind,nbytes,offset", [
    ("legacy", 3 << 20, 0),
    ("legacy", 3 << 20, (5 << 20) + 4096),  # interior offset of a caching-allocator segment
    ("vmm", 6 << 20, 0),
    ("vmm", 3 << 20, (2 << 20) + 4096),  # starts inside the first piece, ends in the second
    ("expandable", 3 << 20, 0),
])
def test_ipc_across_processes(kind, nbytes, offset):
    from kvbm_shm.device.ipc import HandleCache

    parent, child = _ctx.Pipe()
    proc = _ctx.Process(target=_exporter, args=(child, kind, nbytes, offset), daemon=True)
    proc.start()
    try:
        assert parent.poll(120), "the exporter did not answer"
        tag, body = parent.recv()
        if tag == "error" and kind == "expandable" and any(m in body for m in _NO_POSIX_FD):
            pytest.skip(f"this PyTorch creates expandable segments without POSIX fds: {body}")
        assert tag == "handles", body
        (handle,) = _handles.decode(body)
        expected = {"legacy": p.CudaIpcTensor, "vmm": p.CudaVmmTensor, "expandable": p.CudaVmmTensor}[kind]
        assert isinstance(handle.memory, expected)
        if kind == "legacy":
            assert handle.memory.offset >= offset  # base + offset, not the tensor's own pointer
        if kind == "vmm":
            assert handle.memory.offset == offset and len(handle.memory.pieces) == 2
        cache = HandleCache()
        address, on_gpu = cache.open(handle)
        assert on_gpu
        assert np.array_equal(_read_device(address, nbytes), _pattern(nbytes, 1))
        parent.send("write")
        assert parent.recv() == "written"
        assert np.array_equal(_read_device(address, nbytes), _pattern(nbytes, 2))  # the importer sees it
        _write_device(address, _pattern(nbytes, 3))
        parent.send("check")
        assert parent.recv() is True  # and the exporter sees the importer's writes
        cache.release(handle)
        assert len(cache) == 0
        with pytest.raises(DeviceError):  # unmapped in this process
            cuda_driver.check(cuda_driver.driver().cuMemGetAddressRange(address), "cuMemGetAddressRange")
        parent.send("stop")
        assert parent.recv() == "bye"
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


# ---------------------------------------------------------------- copy engine against torch


def _layouts(num_blocks: int, page: int, heads: int, head_dim: int, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
    yield "vllm_flash_kv_split", [r(2, num_blocks, page, heads, head_dim) for _ in range(3)], 1
    yield "per_layer_block_major", [r(num_blocks, 2, page, heads, head_dim) for _ in range(3)], 0
    yield "all_layers_one_tensor", [r(3, 2, num_blocks, page, heads * head_dim)], 2


def _engine(path: str):
    """A copy engine on the current GPU; "dma_loop" is DMA without cuMemcpyBatchAsync."""
    from kvbm_shm.kernels.cuda_copy import CudaCopyEngine

    engine = CudaCopyEngine(torch.cuda.current_device(), "dma" if path == "dma_loop" else path)
    if path == "dma_loop":
        engine.dma_batch = False
    return engine


class _PinnedHost:
    """An anonymous mapping, page-locked for the GPU and known to the engine."""

    def __init__(self, engine, nbytes: int):
        from kvbm_shm.kernels.host_register import HostRegistration

        self.engine = engine
        self.map = mmap.mmap(-1, nbytes)
        self.array = np.frombuffer(self.map, np.uint8)
        self.reg = HostRegistration(self.array.ctypes.data, nbytes, engine.ordinal)
        engine.add_host_memory(self.reg)

    def close(self) -> None:
        self.engine.remove_host_memory(self.reg)
        self.reg.close()
        self.array = None
        self.map.close()


@pytest.mark.parametrize("page,heads,head_dim,dtype", [
    (16, 8, 128, torch.float16),  # 32 KiB chunks
    (64, 4, 64, torch.bfloat16),  # 32 KiB
    (4, 1, 8, torch.float32),  # 128-byte chunks
    (3, 1, 3, torch.float32),  # 36-byte chunks: not a multiple of 16 bytes, the kernel's byte loop runs
    (256, 8, 128, torch.float16),  # 512 KiB chunks
])
@pytest.mark.parametrize("path", ["kernel", "dma", "dma_loop"])
def test_copy_engine_equals_torch(page, heads, head_dim, dtype, path):
    from kvbm_shm.layout import EngineLayout

    engine = _engine(path)
    num_blocks = 24
    try:
        for name, tensors, axis in _layouts(num_blocks, page, heads, head_dim, dtype):
            table = EngineLayout.of(tensors, axis).bind(tensors)
            src_ids = [17, 3, 4, 5, 22, 0, 9]
            stride = -(-table.block_bytes // 4096) * 4096
            host = _PinnedHost(engine, stride * len(src_ids))
            try:
                addrs = host.array.ctypes.data + np.arange(len(src_ids), dtype=np.uint64) * np.uint64(stride)
                torch.cuda.synchronize()  # the sources are filled on torch's stream
                assert engine.gather(table, src_ids, addrs) == len(src_ids) * table.block_bytes
                for i, b in enumerate(src_ids):  # reference: the block's chunks in layout order
                    ref = torch.cat([_chunks(t, axis, b) for t in tensors])
                    got = torch.from_numpy(host.array[i * stride:i * stride + table.block_bytes].copy())
                    assert torch.equal(got, ref), f"{name}: gathered block {b} differs"
                dst = [torch.zeros_like(t) for t in tensors]
                dst_ids = [0, 1, 2, 8, 9, 10, 23]
                torch.cuda.synchronize()  # the zero fill must land before the scatter, not after
                engine.scatter(EngineLayout.of(dst, axis).bind(dst), dst_ids, addrs)
                torch.cuda.synchronize()
                for s, d in zip(tensors, dst):
                    for i, j in zip(src_ids, dst_ids):
                        assert torch.equal(s.select(axis, i), d.select(axis, j)), f"{name}: scattered block differs"
                untouched = [b for b in range(num_blocks) if b not in dst_ids]
                assert all(d.select(axis, b).abs().sum().item() == 0 for d in dst for b in untouched)
            finally:
                host.close()
        if path == "kernel":
            assert engine.kernel.reason is None  # the kernel ran; it did not fall back to DMA
    finally:
        engine.close()


def _chunks(t, axis: int, block: int):
    """A block's bytes in G2 order: its chunk for every index of the axes before the block axis."""
    part = t.select(axis, block).contiguous()  # outer axes first, then the block's own: G2 order
    return part.reshape(-1).view(torch.uint8).cpu()


@pytest.mark.parametrize("path", ["kernel", "dma", "dma_loop"])
def test_more_regions_than_one_dma_batch(path):
    from kvbm_shm.kernels.cuda_copy import DMA_BATCH_MAX

    n, region, stride = 3 * DMA_BATCH_MAX + 5, 48, 64
    engine = _engine(path)
    host = _PinnedHost(engine, n * stride)
    try:
        src = torch.from_numpy(_pattern(n * stride, 7)).cuda()
        dst = torch.zeros(n * stride, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        offsets = np.arange(n, dtype=np.uint64) * np.uint64(stride)
        size = np.full(n, region, np.uint64)
        host_at = np.uint64(host.array.ctypes.data) + offsets
        assert engine.copy(True, np.uint64(src.data_ptr()) + offsets, host_at, size) == path.split("_")[0]
        assert engine.copy(False, np.uint64(dst.data_ptr()) + offsets, host_at, size) == path.split("_")[0]
        torch.cuda.synchronize()
        mask = (np.arange(n * stride) % stride) < region
        assert np.array_equal(host.array[mask], _pattern(n * stride, 7)[mask])
        assert torch.equal(dst.cpu()[torch.from_numpy(mask)], src.cpu()[torch.from_numpy(mask)])
        assert dst.cpu()[torch.from_numpy(~mask)].sum().item() == 0
    finally:
        host.close()
        engine.close()


@pytest.mark.parametrize("path", ["kernel", "dma"])
def test_regions_outside_registered_memory_and_bad_block_ids_launch_nothing(path):
    from kvbm_shm.errors import RequestError
    from kvbm_shm.layout import EngineLayout

    engine = _engine(path)
    host = _PinnedHost(engine, 1 << 20)
    try:
        dev = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        at = np.array([host.array.ctypes.data + (1 << 20) - 4096], np.uint64)
        with pytest.raises(DeviceError, match="not inside memory page-locked"):  # its end is past the range
            engine.copy(True, np.array([dev.data_ptr()], np.uint64), at, np.array([8192], np.uint64))
        tensors = [torch.zeros(4, 2, 16, 8, device="cuda")]
        table = EngineLayout.of(tensors, 0).bind(tensors)
        for ids in ([4], [-1]):
            with pytest.raises(RequestError):
                engine.gather(table, ids, [host.array.ctypes.data])
        assert engine.copy(True, np.array([dev.data_ptr()], np.uint64), at, np.array([4096], np.uint64)) == path
    finally:
        host.close()
        engine.close()


def test_a_kernel_that_cannot_load_leaves_every_copy_to_dma():
    engine = _engine("auto")
    host = _PinnedHost(engine, 1 << 20)
    try:
        engine.kernel.give_up("as if libnvrtc could not be loaded")
        src = torch.from_numpy(_pattern(1 << 20, 9)).cuda()
        torch.cuda.synchronize()
        offsets = np.arange(1024, dtype=np.uint64) * np.uint64(1024)
        size = np.full(1024, 1000, np.uint64)
        dev_at, host_at = np.uint64(src.data_ptr()) + offsets, np.uint64(host.array.ctypes.data) + offsets
        assert engine.copy(True, dev_at, host_at, size) == "dma"
        assert engine.copy(True, dev_at, host_at, size, "kernel") == "dma"
        assert engine.calibration is None  # auto had nothing to choose between: no calibration run
        mask = (np.arange(1 << 20) % 1024) < 1000
        assert np.array_equal(host.array[mask], _pattern(1 << 20, 9)[mask])
    finally:
        host.close()
        engine.close()


def test_calibration_figures_stand_against_one_large_copy():
    from kvbm_shm.kernels.cuda_copy import PATHS, pick_path

    engine = _engine("auto")
    drv = cuda_driver.driver()
    nbytes = 16 << 20
    dev = int(cuda_driver.check(drv.cuMemAlloc(nbytes), "cuMemAlloc"))
    host = int(cuda_driver.check(drv.cuMemAllocHost(nbytes), "cuMemAllocHost"))
    try:
        one_copy = {}
        for name, (dst, src) in (("d2h", (host, dev)), ("h2d", (dev, host))):
            best = float("inf")
            for _ in range(4):
                t0 = time.perf_counter()
                cuda_driver.check(drv.cuMemcpy(dst, src, nbytes), "cuMemcpy")
                best = min(best, time.perf_counter() - t0)
            one_copy[name] = nbytes / best / 1e9
        result = engine.calibrate(total_bytes=nbytes, repeats=2)
        for direction in ("d2h", "h2d"):
            for region, by_path in result[direction].items():
                assert set(by_path) == set(PATHS)
                for path, gbps in by_path.items():  # nothing outruns the link one large copy saturates
                    assert 0 < gbps <= 1.25 * one_copy[direction], (direction, region, path, gbps, one_copy)
                assert engine.choose(direction == "d2h", region) == max(by_path, key=by_path.get)
            assert result[direction][4 << 20]["dma"] >= 0.5 * one_copy[direction], (result, one_copy)
            assert pick_path(result[direction], 4 << 20) == engine.choose(direction == "d2h", 4 << 20)
    finally:
        cuda_driver.check(drv.cuMemFreeHost(host), "cuMemFreeHost")
        cuda_driver.check(drv.cuMemFree(dev), "cuMemFree")
        engine.close()


def test_host_registration_from_a_thread_without_a_context_and_unregistration():
    from kvbm_shm.kernels.host_register import HostRegistration

    drv = cuda_driver.driver()
    buf = mmap.mmap(-1, 1 << 20)
    address = np.frombuffer(buf, np.uint8).ctypes.data
    out = {}

    def register():  # a new thread has no current context until something makes one current
        try:
            out["ctx"] = cuda_driver.check(drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
            out["reg"] = HostRegistration(address, 1 << 20, ordinal)
        except Exception as e:  # reported below, in the test's thread
            out["error"] = e

    ordinal = torch.cuda.current_device()

    thread = threading.Thread(target=register)
    thread.start()
    thread.join(30)
    assert "error" not in out, out.get("error")
    assert int(out["ctx"]) == 0, "the new thread already had a context"
    reg = out["reg"]
    cuda_driver.use_device(ordinal)  # this thread's own context, for the checks below
    cuda_driver.check(drv.cuMemHostGetDevicePointer(address, 0), "cuMemHostGetDevicePointer")
    reg.close()
    reg.close()  # idempotent
    with pytest.raises(DeviceError):
        cuda_driver.check(drv.cuMemHostGetDevicePointer(address, 0), "cuMemHostGetDevicePointer")
    HostRegistration(address, 1 << 20, ordinal).close()  # not left registered
    buf.close()


# ---------------------------------------------------------------- end to end


def _gpu_engine(instance: str, runtime_dir: str, offload: bool, expandable: bool, seed: int, n: int,
                device_ids: list[int]) -> dict:
    if expandable:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    import torch

    from kvbm_shm.device.client import DeviceKv

    from .test_device_tier import NB, connect, hashes, namespace

    ns = namespace()
    with connect(instance, runtime_dir) as client:
        pool = client.register_layout(ns)
        tensors = [torch.zeros(NB, *t.block_shape, device="cuda") for t in ns.engine_layout.tensors]
        if offload:
            g = torch.Generator(device="cuda").manual_seed(seed)
            for t in tensors:
                t.copy_(torch.randn(t.shape, generator=g, device="cuda"))
        torch.cuda.synchronize()  # the worker copies on its own streams, in another process
        with DeviceKv.register(client, pool, tensors, mode="worker") as dev:
            t = dev.offload(hashes(seed, n), device_ids) if offload else dev.onboard(hashes(seed, n), device_ids)
            result = t.wait(timeout_s=60)
        blocks = [torch.cat([x[b].reshape(-1).view(torch.uint8) for x in tensors]).cpu().numpy() for b in device_ids]
        from kvbm_shm.kernels import cpu_copy

        return {"result": result, "checksums": [cpu_copy.checksum(b) for b in blocks]}


@pytest.mark.parametrize("expandable", [False, True], ids=["cudaMalloc", "expandable_segments"])
def test_offload_and_onboard_through_the_worker_on_gpu(coordinator, runtime_dir, expandable):
    from .procs import run_child

    src = [5, 1, 19, 7]
    a = run_child(_gpu_engine, coordinator.instance, str(runtime_dir), True, False, 3, len(src), src, timeout_s=180)
    assert a["result"].moved == len(src) and not a["result"].failed, a["result"]
    try:
        b = run_child(_gpu_engine, coordinator.instance, str(runtime_dir), False, expandable, 3, len(src),
                      [0, 2, 4, 6], timeout_s=180)
    except AssertionError as e:
        if expandable and any(m in str(e) for m in _NO_POSIX_FD):
            pytest.skip("this PyTorch creates expandable segments without POSIX fds")
        raise
    assert b["result"].loaded == len(src) and not b["result"].failed, b["result"]
    assert b["checksums"] == a["checksums"]


def test_gpu_onboard_skips_and_reports_a_block_that_fails_its_checksum(coordinator, runtime_dir):
    from kvbm_shm.kernels import cpu_copy

    from .procs import run_child
    from .test_device_tier import connect, hashes, namespace

    src = [5, 1, 19, 7]
    a = run_child(_gpu_engine, coordinator.instance, str(runtime_dir), True, False, 4, len(src), src, timeout_s=180)
    assert a["result"].moved == len(src) and not a["result"].failed, a["result"]
    ns = namespace()
    with connect(coordinator.instance, runtime_dir) as client:
        pool = client.register_layout(ns)
        g2 = client.lookup(pool, hashes(4, len(src)))
        pool.block(g2[2])[100] ^= 0xFF  # bit rot in the third block
        b = run_child(_gpu_engine, coordinator.instance, str(runtime_dir), False, False, 4, len(src),
                      [0, 2, 4, 6], timeout_s=180)
        assert b["result"].failed == [2] and b["result"].loaded == 3, b["result"]
        assert client.lookup(pool, hashes(4, len(src))) == g2[:2]  # invalidated: never served again
    zeros = cpu_copy.checksum(np.zeros(ns.kv.block_bytes, np.uint8))
    assert b["checksums"] == [a["checksums"][0], a["checksums"][1], zeros, a["checksums"][3]]  # block 4 untouched
