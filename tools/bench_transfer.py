"""Benchmark: offload (G1 -> G2) and onboard (G2 -> G1) of scattered KV blocks, per copy path.

The engine's KV is one tensor per layer in vLLM's CPU layout `(num_blocks, heads, page, 2*head)`
(so a block is `layers` chunks, one per tensor); `--gib` of blocks at random device block ids move
to and from contiguous G2 blocks. Each row is the best of `--repeats` runs, beside the physical
limit measured in the same run:

- CPU: `cpu_copy` in this process (what engine-driven mode and the stand-in worker run), and end
  to end through a coordinator: worker-driven (`DeviceKv` mode "worker": protocol + transfer
  worker + checksums) and engine-driven (mode "engine": `Client.store`/`load`). Limit: one
  memmove of the same number of bytes (`ratio_vs_limit`; target >= 0.7).
- GPU (when one is present, or `--gpu`): the kernel and DMA paths of `kernels.cuda_copy` for
  several block sizes, beside one large cuMemcpyAsync between pinned host memory and the device
  (target >= 0.9 for blocks of 256 KiB and more), the calibration the "auto" path uses, and the
  time another process takes to import a legacy IPC handle and a VMM handle.

Prints a table; `--json` prints one
JSON object instead.

    python tools/bench_transfer.py [--gib 1] [--repeats 3] [--no-e2e] [--no-cpu] [--gpu] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import mmap
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvbm_shm.config import ClientConfig  # noqa: E402
from kvbm_shm.kernels import cpu_copy, cuda_driver  # noqa: E402
from kvbm_shm.layout import EngineLayout, KvLayout, Namespace, TensorSpec  # noqa: E402

LAYERS, HEADS, HEAD_DIM = 32, 8, 128  # fp16: one 2 MiB block = 32 chunks of 64 KiB at page 16


def geometry(block_bytes: int, layers: int = LAYERS) -> tuple[int, int]:
    """(page size, chunk bytes) of an fp16 block of `block_bytes` spread over `layers` tensors."""
    chunk = block_bytes // layers
    page = max(1, chunk // (HEADS * 2 * HEAD_DIM * 2))
    return page, page * HEADS * 2 * HEAD_DIM * 2


def namespace(page: int, layers: int = LAYERS) -> Namespace:
    spec = TensorSpec((HEADS, page, 2 * HEAD_DIM), 0, "float16")
    return Namespace("bench", KvLayout(layers, 2, page, HEADS * HEAD_DIM, "float16"), EngineLayout((spec,) * layers))


def best_s(fn, repeats: int) -> float:
    fn()  # warm-up (first touch, compilation, registration)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2)


def scattered_ids(num_device_blocks: int, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).permutation(num_device_blocks)[:n].tolist()


# ---------------------------------------------------------------- CPU


def bench_cpu(gib: float, repeats: int, e2e: bool) -> list[dict]:
    page, _ = geometry(2 << 20)
    ns = namespace(page)
    block = ns.kv.block_bytes
    n = int(gib * (1 << 30)) // block
    nbytes = n * block
    num_device = n * 3 // 2
    tensors = [torch.ones(num_device, HEADS, page, 2 * HEAD_DIM, dtype=torch.float16) for _ in range(LAYERS)]
    table = ns.engine_layout.bind(tensors)
    g2 = np.ones(nbytes, np.uint8)  # contiguous G2 blocks, pre-faulted
    addrs = g2.ctypes.data + np.arange(n, dtype=np.uint64) * np.uint64(block)
    ids = scattered_ids(num_device, n)
    src = np.ones(nbytes, np.uint8)
    memcpy_s = best_s(lambda: ctypes.memmove(g2.ctypes.data, src.ctypes.data, nbytes), repeats)
    src = None
    limit = gbps(nbytes, memcpy_s)
    rows = []

    def row(path, direction, seconds):
        rows.append({"device": "cpu", "path": path, "direction": direction, "block_bytes": block,
                     "chunk_bytes": block // LAYERS, "bytes": nbytes, "gbps": gbps(nbytes, seconds),
                     "limit": "memcpy", "limit_gbps": limit, "ratio_vs_limit": round(memcpy_s / seconds, 3)})

    threads = ClientConfig().copy_threads
    row("cpu_copy 1 thread", "offload", best_s(lambda: cpu_copy.gather(table, ids, addrs), repeats))
    row("cpu_copy 1 thread", "onboard", best_s(lambda: cpu_copy.scatter(table, ids, addrs), repeats))
    row(f"cpu_copy {threads} threads", "offload", best_s(lambda: cpu_copy.gather(table, ids, addrs, threads), repeats))
    row(f"cpu_copy {threads} threads", "onboard", best_s(lambda: cpu_copy.scatter(table, ids, addrs, threads), repeats))
    g2 = tensors = table = None  # free 2.5 GiB before the end-to-end runs
    if e2e:
        rows += bench_cpu_e2e(ns, n, num_device, repeats, memcpy_s, limit)
    return rows


def bench_cpu_e2e(ns: Namespace, n: int, num_device: int, repeats: int, memcpy_s: float, limit: float) -> list[dict]:
    """The same transfer through a coordinator, worker-driven and engine-driven."""
    from kvbm_shm.client import Client
    from kvbm_shm.device_client import DeviceKv
    from kvbm_shm.standin import StandInKv

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from procs import CoordinatorProcess

    block = ns.kv.block_bytes
    nbytes = n * block
    instance = f"bench{uuid.uuid4().hex[:6]}"
    runtime_dir = Path(tempfile.mkdtemp(prefix="kvb", dir="/tmp"))
    pool_gb = (nbytes * 1.05 + (64 << 20)) / (1 << 30)
    coordinator = CoordinatorProcess(instance, runtime_dir, cpu_cache_gb=pool_gb, lease_ms=30000).start(timeout_s=120)
    rows = []
    try:
        with Client(instance=instance, runtime_dir=runtime_dir, timeout_s=120) as client:
            pool = client.register_layout(ns)
            kv = StandInKv.create(instance, [(num_device, *t.block_shape) for t in ns.engine_layout.tensors],
                                  torch.float16)
            try:
                for t in kv.tensors:
                    t.fill_(1)
                ids = scattered_ids(num_device, n)
                for mode in ("worker", "engine"):
                    dev = DeviceKv.register(client, pool, kv.tensors, mode=mode)
                    round_ = iter(range(1_000_000))
                    stored: list[list[bytes]] = []

                    def offload():
                        r = next(round_)  # new hashes every round: nothing is cached yet
                        batch = [(r * n + i).to_bytes(8, "little") + mode.encode().ljust(8, b"\0") for i in range(n)]
                        result = dev.offload(batch, ids).wait()
                        assert result.moved == n, result
                        stored.append(batch)

                    def onboard():
                        result = dev.onboard(stored[-1], ids).wait()
                        assert result.loaded == n, result

                    for direction, fn in (("offload", offload), ("onboard", onboard)):
                        seconds = best_s(fn, repeats)
                        rows.append({"device": "cpu", "path": f"e2e_{mode}_driven", "direction": direction,
                                     "block_bytes": block, "chunk_bytes": block // LAYERS, "bytes": nbytes,
                                     "gbps": gbps(nbytes, seconds), "limit": "memcpy", "limit_gbps": limit,
                                     "ratio_vs_limit": round(memcpy_s / seconds, 3)})
                    dev.unregister()
            finally:
                kv.close()
    finally:
        coordinator.stop(60)
        coordinator.remove_leftovers()
        shutil.rmtree(runtime_dir, ignore_errors=True)
    return rows


# ---------------------------------------------------------------- GPU


def bench_gpu(gib: float, repeats: int) -> dict:
    from kvbm_shm.kernels.cuda_copy import PATHS, CudaCopyEngine
    from kvbm_shm.kernels.host_register import HostRegistration

    ordinal = torch.cuda.current_device()
    engine = CudaCopyEngine(ordinal)
    drv = cuda_driver.driver()
    nbytes = int(gib * (1 << 30))
    host_map = mmap.mmap(-1, nbytes)
    host = np.frombuffer(host_map, np.uint8)
    host[:] = 1  # first touch before registering
    reg = HostRegistration(host.ctypes.data, nbytes)
    engine.add_host_memory(reg)
    rows = []
    try:
        dev_ref = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        stream = cuda_driver.check(drv.cuStreamCreate(int(drv.CUstream_flags.CU_STREAM_NON_BLOCKING)), "cuStreamCreate")

        def one_copy(to_host: bool):
            dst, src = (host.ctypes.data, dev_ref.data_ptr()) if to_host else (dev_ref.data_ptr(), host.ctypes.data)
            cuda_driver.check(drv.cuMemcpyAsync(dst, src, nbytes, stream), "cuMemcpyAsync")
            cuda_driver.check(drv.cuStreamSynchronize(stream), "cuStreamSynchronize")

        limits = {True: best_s(lambda: one_copy(True), repeats), False: best_s(lambda: one_copy(False), repeats)}
        dev_ref = None
        for block_kib in (64, 256, 1024, 4096):
            page, chunk = geometry(block_kib << 10)
            ns = namespace(page)
            block = ns.kv.block_bytes
            n = nbytes // block
            num_device = n * 3 // 2
            tensors = [torch.ones(num_device, HEADS, page, 2 * HEAD_DIM, dtype=torch.float16, device="cuda")
                       for _ in range(LAYERS)]
            table = ns.engine_layout.bind(tensors)
            ids = scattered_ids(num_device, n)
            addrs = host.ctypes.data + np.arange(n, dtype=np.uint64) * np.uint64(block)
            for path in PATHS:
                for direction, to_host in (("offload", True), ("onboard", False)):
                    copy = engine.gather if to_host else engine.scatter
                    seconds = best_s(lambda: copy(table, ids, addrs, path), repeats)
                    rows.append({"device": "gpu", "path": path, "direction": direction, "block_bytes": block,
                                 "chunk_bytes": chunk, "bytes": n * block, "gbps": gbps(n * block, seconds),
                                 "limit": "cuMemcpyAsync 1 copy", "limit_gbps": gbps(nbytes, limits[to_host]),
                                 "ratio_vs_limit": round((limits[to_host] / nbytes) / (seconds / (n * block)), 3)})
            del tensors
            torch.cuda.empty_cache()
        calibration = engine.calibrate()
        cuda_driver.check(drv.cuStreamDestroy(stream), "cuStreamDestroy")
    finally:
        engine.remove_host_memory(reg)
        reg.close()
        engine.close()
        host = None  # drop the view before unmapping
        host_map.close()
    return {"rows": rows, "calibration": calibration, "import_ms": bench_import()}


def _import_child(conn) -> None:
    """Import each handle the parent sends; answer the milliseconds the first open took."""
    import msgspec

    from kvbm_shm import protocol as p
    from kvbm_shm.device_ipc import HandleCache

    cache = HandleCache()
    decoder = msgspec.msgpack.Decoder(p.TensorHandle)
    while (body := conn.recv()) is not None:
        handle = decoder.decode(body)
        t0 = time.perf_counter()
        cache.open(handle)
        conn.send(round((time.perf_counter() - t0) * 1e3, 3))
        cache.release(handle)


def bench_import() -> dict:
    """Time for another process to import a legacy handle and a VMM (2 x 32 MiB pieces) handle."""
    import msgspec

    from kvbm_shm.device_ipc import export_tensors

    legacy = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    vmm = _VmmRange(64 << 20)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_import_child, args=(child,), daemon=True)
    proc.start()
    out = {}
    try:
        for name, tensor in (("legacy_ipc", legacy), ("vmm_fd", vmm)):
            (handle,), exports = export_tensors([tensor])
            try:
                parent.send(msgspec.msgpack.encode(handle))
                out[name] = parent.recv() if parent.poll(120) else None
            finally:
                exports.release()
        parent.send(None)
    finally:
        proc.join(30)
        vmm.close()
    return out


class _VmmRange:
    """cuMemCreate memory (POSIX fd handle type) in two pieces mapped back to back, as a uint8 tensor."""

    def __init__(self, nbytes: int):
        drv = cuda_driver.driver()
        ordinal = torch.cuda.current_device()
        cuda_driver.use_device(ordinal)
        prop = drv.CUmemAllocationProp()
        prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = ordinal
        prop.requestedHandleTypes = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        self.piece = nbytes // 2
        self.va = int(cuda_driver.check(drv.cuMemAddressReserve(nbytes, 0, 0, 0), "cuMemAddressReserve"))
        for i in range(2):
            h = cuda_driver.check(drv.cuMemCreate(self.piece, prop, 0), "cuMemCreate")
            cuda_driver.check(drv.cuMemMap(self.va + i * self.piece, self.piece, 0, h, 0), "cuMemMap")
            cuda_driver.check(drv.cuMemRelease(h), "cuMemRelease")
        access = drv.CUmemAccessDesc()
        access.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = ordinal
        access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        cuda_driver.check(drv.cuMemSetAccess(self.va, nbytes, [access], 1), "cuMemSetAccess")
        self.shape, self.dtype, self.nbytes = (nbytes,), "uint8", nbytes
        self.device = type("Device", (), {"type": "cuda"})()

    def data_ptr(self) -> int:
        return self.va

    def stride(self):
        return (1,)

    def element_size(self) -> int:
        return 1

    def close(self) -> None:
        drv = cuda_driver.driver()
        cuda_driver.check(drv.cuMemUnmap(self.va, self.nbytes), "cuMemUnmap")
        cuda_driver.check(drv.cuMemAddressFree(self.va, self.nbytes), "cuMemAddressFree")


# ---------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def print_table(report: dict) -> None:
    print(f"machine: {report['machine']}")
    print(f"{'dev':4} {'path':22} {'dir':8} {'block':>8} {'chunk':>8} {'GB/s':>7} {'limit GB/s':>10} {'ratio':>6}")
    for r in report["rows"]:
        print(f"{r['device']:4} {r['path']:22} {r['direction']:8} {r['block_bytes'] >> 10:>7}K "
              f"{r['chunk_bytes'] >> 10:>7}K {r['gbps']:>7.2f} {r['limit_gbps']:>10.2f} {r['ratio_vs_limit']:>6.2f}")
    if report.get("calibration"):
        print("GPU calibration (GB/s by direction, region bytes, path):", json.dumps(report["calibration"]))
    if report.get("import_ms"):
        print("handle import in another process (ms):", json.dumps(report["import_ms"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gib", type=float, default=1.0, help="bytes of blocks per transfer, in GiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-e2e", action="store_true", help="skip the runs through a coordinator")
    parser.add_argument("--gpu", action="store_true", help="fail unless the GPU part runs")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU part")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report: dict = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "rows": []}
    if not args.no_cpu:
        report["rows"] += bench_cpu(args.gib, args.repeats, not args.no_e2e)
    if cuda_driver.gpu_available() and torch.cuda.is_available():
        report["machine"] += f", {torch.cuda.get_device_name()}"
        gpu = bench_gpu(args.gib, args.repeats)
        report["rows"] += gpu["rows"]
        report["calibration"], report["import_ms"] = gpu["calibration"], gpu["import_ms"]
    elif args.gpu:
        print("bench_transfer: --gpu given but no usable GPU", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
