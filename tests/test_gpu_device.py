"""The device tier on a GPU: CUDA IPC across processes, copy kernels against torch, end to end.

Marked `gpu`; skipped cleanly without a GPU, a driver, or a CUDA build of torch.
- legacy IPC: a tensor at an interior offset of a caching-allocator segment, exported by one
  process (handle of the allocation base + offset, device by UUID) and imported by another,
  which sees the exporter's writes, and the exporter the importer's;
- VMM: memory from cuMemCreate (two physical allocations mapped back to back, as expandable
  segments do) exported as POSIX fds over AF_UNIX and imported; and PyTorch's own
  expandable_segments allocations;
- the copy engine, kernel and DMA paths, equal to a torch reference on random data over several
  layouts, dtypes and block sizes, both directions;
- end to end: engine A (GPU tensors) offloads through the transfer worker, engine B onboards.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import types

import msgspec
import numpy as np
import pytest

from kvbm_shm import protocol as p
from kvbm_shm.kernels import cuda_driver

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (cuda_driver.gpu_available() and torch.cuda.is_available()),
                       reason="needs a CUDA GPU, its driver and a CUDA build of torch"),
]

_ctx = mp.get_context("spawn")
_handles = msgspec.msgpack.Decoder(list[p.TensorHandle])


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

    from kvbm_shm.device_ipc import export_tensors

    try:
        if kind == "vmm":
            tensor = _vmm_tensor(nbytes)
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
    """A cuMemCreate range seen as a uint8 tensor (what device_ipc needs of a tensor)."""

    def __init__(self, address: int, nbytes: int):
        self.address, self.shape, self.dtype = address, (nbytes,), "uint8"
        self.device = types.SimpleNamespace(type="cuda")

    def data_ptr(self) -> int:
        return self.address

    def stride(self):
        return (1,)

    def element_size(self) -> int:
        return 1


def _vmm_tensor(nbytes: int):
    """Two physical allocations (POSIX fd handle type) mapped back to back, like expandable segments."""
    drv = cuda_driver.driver()
    cuda_driver.use_device(0)
    prop = drv.CUmemAllocationProp()
    prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = 0
    prop.requestedHandleTypes = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    gran = int(cuda_driver.check(drv.cuMemGetAllocationGranularity(
        prop, drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM), "granularity"))
    piece = -(-nbytes // 2 // gran) * gran
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
    return _RawCudaTensor(va, nbytes)


@pytest.mark.parametrize("kind,nbytes,offset", [
    ("legacy", 3 << 20, 0),
    ("legacy", 3 << 20, (5 << 20) + 4096),  # interior offset of a caching-allocator segment
    ("vmm", 6 << 20, 0),
    ("expandable", 3 << 20, 0),
])
def test_ipc_across_processes(kind, nbytes, offset):
    from kvbm_shm.device_ipc import HandleCache

    parent, child = _ctx.Pipe()
    proc = _ctx.Process(target=_exporter, args=(child, kind, nbytes, offset), daemon=True)
    proc.start()
    try:
        assert parent.poll(120), "the exporter did not answer"
        tag, body = parent.recv()
        if tag == "error" and kind == "expandable" and "without a shareable handle type" in body:
            pytest.skip(f"this PyTorch creates expandable segments without POSIX fds: {body}")
        assert tag == "handles", body
        (handle,) = _handles.decode(body)
        expected = {"legacy": p.CudaIpcTensor, "vmm": p.CudaVmmTensor, "expandable": p.CudaVmmTensor}[kind]
        assert isinstance(handle.memory, expected)
        if kind == "legacy":
            assert handle.memory.offset >= offset  # base + offset, not the tensor's own pointer
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


@pytest.mark.parametrize("page,heads,head_dim,dtype", [
    (16, 8, 128, torch.float16),  # 32 KiB chunks
    (64, 4, 64, torch.bfloat16),  # 32 KiB
    (4, 1, 8, torch.float32),  # 128-byte chunks
    (256, 8, 128, torch.float16),  # 512 KiB chunks
])
@pytest.mark.parametrize("path", ["kernel", "dma"])
def test_copy_engine_equals_torch(page, heads, head_dim, dtype, path):
    from kvbm_shm.kernels.cuda_copy import CudaCopyEngine
    from kvbm_shm.kernels.host_register import HostRegistration
    from kvbm_shm.layout import EngineLayout

    engine = CudaCopyEngine(torch.cuda.current_device(), path)
    num_blocks = 24
    try:
        for name, tensors, axis in _layouts(num_blocks, page, heads, head_dim, dtype):
            table = EngineLayout.of(tensors, axis).bind(tensors)
            src_ids = [17, 3, 4, 5, 22, 0, 9]
            stride = -(-table.block_bytes // 4096) * 4096
            host = mmap.mmap(-1, stride * len(src_ids))
            base = np.frombuffer(host, np.uint8)
            reg = HostRegistration(base.ctypes.data, len(base))
            engine.add_host_memory(reg)
            try:
                addrs = base.ctypes.data + np.arange(len(src_ids), dtype=np.uint64) * np.uint64(stride)
                assert engine.gather(table, src_ids, addrs) == len(src_ids) * table.block_bytes
                for i, b in enumerate(src_ids):  # reference: the block's chunks in layout order
                    ref = torch.cat([_chunks(t, axis, b) for t in tensors])
                    got = torch.from_numpy(base[i * stride:i * stride + table.block_bytes].copy())
                    assert torch.equal(got, ref), f"{name}: gathered block {b} differs"
                dst = [torch.zeros_like(t) for t in tensors]
                dst_ids = [0, 1, 2, 8, 9, 10, 23]
                engine.scatter(EngineLayout.of(dst, axis).bind(dst), dst_ids, addrs)
                torch.cuda.synchronize()
                for s, d in zip(tensors, dst):
                    for i, j in zip(src_ids, dst_ids):
                        assert torch.equal(s.select(axis, i), d.select(axis, j)), f"{name}: scattered block differs"
                untouched = [b for b in range(num_blocks) if b not in dst_ids]
                assert all(d.select(axis, b).abs().sum().item() == 0 for d in dst for b in untouched)
            finally:
                engine.remove_host_memory(reg)
                reg.close()
                del base
                host.close()
    finally:
        engine.close()


def _chunks(t, axis: int, block: int):
    """A block's bytes in G2 order: its chunk for every index of the axes before the block axis."""
    part = t.select(axis, block).contiguous()  # outer axes first, then the block's own: G2 order
    return part.reshape(-1).view(torch.uint8).cpu()


def test_calibration_picks_a_path_for_every_size():
    from kvbm_shm.kernels.cuda_copy import PATHS, CudaCopyEngine

    engine = CudaCopyEngine(torch.cuda.current_device())
    try:
        result = engine.calibrate(total_bytes=16 << 20, repeats=1)
        for direction in ("d2h", "h2d"):
            for by_path in result[direction].values():
                assert set(by_path) == set(PATHS) and all(v > 0 for v in by_path.values())
        assert engine.choose(True, 4096) in PATHS and engine.choose(False, 4 << 20) in PATHS
    finally:
        engine.close()


# ---------------------------------------------------------------- end to end


def _gpu_engine(instance: str, runtime_dir: str, offload: bool, expandable: bool, seed: int, n: int,
                device_ids: list[int]) -> dict:
    if expandable:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    import torch

    from kvbm_shm.device_client import DeviceKv

    from .test_device_tier import NB, connect, hashes, namespace

    ns = namespace()
    with connect(instance, runtime_dir) as client:
        pool = client.register_layout(ns)
        tensors = [torch.zeros(NB, *t.block_shape, device="cuda") for t in ns.engine_layout.tensors]
        if offload:
            g = torch.Generator(device="cuda").manual_seed(seed)
            for t in tensors:
                t.copy_(torch.randn(t.shape, generator=g, device="cuda"))
            torch.cuda.synchronize()
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
        if expandable and "without a shareable handle type" in str(e):
            pytest.skip("this PyTorch creates expandable segments without POSIX fds")
        raise
    assert b["result"].loaded == len(src) and not b["result"].failed, b["result"]
    assert b["checksums"] == a["checksums"]
