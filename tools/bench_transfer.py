"""Benchmark: offload (G1 -> G2) and onboard (G2 -> G1) of scattered KV blocks, per copy path.

The engine's KV is one tensor per layer in vLLM's CPU layout `(num_blocks, heads, page, 2*head)`
(so a block is `layers` chunks, one per tensor; `geometry` picks heads and page so that every
block size asked for is the size measured); `--gib` of blocks at random device block ids move to
and from contiguous G2 blocks. Every block holds distinct bytes; each run checks its results: the
G2 blocks against the device blocks they came from, and the onboard, which loads into other
device ids (zeroed first), against the source blocks. Each row is the best of `--repeats` runs,
beside the physical limit measured in the same run:

- CPU: `cpu_copy` in this process (what engine-driven mode and the stand-in worker run) with 1
  thread and with the copy threads the product uses (`ClientConfig.copy_threads`, the transfer
  worker's default too), and end to end through a coordinator: worker-driven (`DeviceKv` mode
  "worker": protocol + transfer worker + checksums) and engine-driven (mode "engine":
  `Client.store`/`load`). Limit: the best single contiguous copy of the same number of bytes
  with 1..N threads (N = those copy threads), by glibc memmove and by the C engine's streaming
  copy (non-temporal stores, the faster of the two where the caches are small), each reported
  (`memcpy_gbps_by_threads`); `ratio_vs_limit` divides by the best (target >= 0.7).
- GPU (when one is present, or `--gpu`): the kernel and DMA paths of `kernels.cuda_copy` for
  blocks of 64 KiB to 2 MiB, beside one large cuMemcpyAsync between pinned host memory and the
  device (target >= 0.9 for blocks of 256 KiB and more), the calibration the "auto" path uses, and
  the time another process, its device already initialised, takes to import a legacy IPC handle
  and a VMM handle.

Prints a table; `--json` prints one
JSON object instead.

    python tools/bench_transfer.py [--gib 1] [--repeats 3] [--no-e2e] [--no-cpu] [--gpu] [--json]
"""

from __future__ import annotations

import argparse
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

import benchlib  # noqa: E402  (puts the repository on sys.path)
from kvbm_shm.config import ClientConfig  # noqa: E402
from kvbm_shm.kernels import cpu_copy, cuda_driver  # noqa: E402
from kvbm_shm.layout import EngineLayout, KvLayout, Namespace, TensorSpec  # noqa: E402

LAYERS, MAX_HEADS, HEAD_DIM = 32, 8, 128  # fp16: one 2 MiB block = 32 chunks of 64 KiB (8 heads, page 16)
TOKEN_BYTES_PER_HEAD = 2 * HEAD_DIM * 2  # K and V, fp16
GPU_BLOCK_KIB = (64, 256, 1024, 2048)


def geometry(block_bytes: int, layers: int = LAYERS) -> tuple[int, int]:
    """(kv heads, page size) of an fp16 block of exactly `block_bytes` over `layers` tensors: up to
    8 heads, then more tokens per page (64 KiB: 4 heads, page 1; 2 MiB: 8 heads, page 16)."""
    chunk = block_bytes // layers
    heads = max(1, min(MAX_HEADS, chunk // TOKEN_BYTES_PER_HEAD))
    page = chunk // (heads * TOKEN_BYTES_PER_HEAD)
    if chunk * layers != block_bytes or page * heads * TOKEN_BYTES_PER_HEAD != chunk:
        raise ValueError(f"{block_bytes}-byte blocks cannot be {layers} chunks of whole fp16 tokens")
    return heads, page


def namespace(heads: int, page: int, layers: int = LAYERS) -> Namespace:
    spec = TensorSpec((heads, page, 2 * HEAD_DIM), 0, "float16")
    return Namespace("bench", KvLayout(layers, 2, page, heads * HEAD_DIM, "float16"), EngineLayout((spec,) * layers))


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


def block_ids(num_device_blocks: int, n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Two disjoint sets of `n` scattered device block ids: offloaded from, onboarded into."""
    perm = np.random.default_rng(seed).permutation(num_device_blocks)
    return perm[:n].tolist(), perm[n:2 * n].tolist()


def fill_distinct(tensors) -> None:
    """Every 4-byte word of every block of every tensor a different value (CPU or GPU tensors)."""
    for layer, t in enumerate(tensors):
        words = t.view(torch.int32).view(t.shape[0], -1)
        per_block = words.shape[1]
        value = torch.arange(per_block, dtype=torch.int64, device=t.device)[None, :] + \
            torch.arange(t.shape[0], dtype=torch.int64, device=t.device)[:, None] * (per_block * len(tensors))
        words.copy_((value + layer * per_block).to(torch.int32))


def check_offload(tensors, ids: list[int], g2: np.ndarray) -> None:
    """G2 block i holds the chunks of device block ids[i], layer by layer."""
    n, chunk = len(ids), g2.nbytes // len(ids) // len(tensors)
    rows = torch.from_numpy(g2.view(np.uint8)[:n * chunk * len(tensors)].reshape(n, len(tensors), chunk))
    index = torch.tensor(ids, device=tensors[0].device)
    for layer, t in enumerate(tensors):
        want = t.index_select(0, index).reshape(n, -1).view(torch.uint8).cpu()
        if not torch.equal(rows[:, layer], want):
            raise AssertionError(f"offload: G2 blocks differ from their device blocks in layer {layer}")


def check_onboard(tensors, ids: list[int], other: list[int]) -> None:
    """Device blocks other[i] hold what ids[i] holds, in every layer (compared as integers)."""
    a = torch.tensor(ids, device=tensors[0].device)
    b = torch.tensor(other, device=tensors[0].device)
    for layer, t in enumerate(tensors):
        words = t.view(torch.int32)
        if not torch.equal(words.index_select(0, a), words.index_select(0, b)):
            raise AssertionError(f"onboard: device blocks differ from the blocks stored, layer {layer}")


def clear(tensors, ids: list[int]) -> None:
    index = torch.tensor(ids, device=tensors[0].device)
    for t in tensors:
        t.index_fill_(0, index, 0)


# ---------------------------------------------------------------- CPU


def bench_cpu(gib: float, repeats: int, e2e: bool) -> dict:
    heads, page = geometry(2 << 20)
    ns = namespace(heads, page)
    block = ns.kv.block_bytes
    n = int(gib * (1 << 30)) // block
    nbytes = n * block
    threads = ClientConfig().copy_threads
    memcpy_gbps = benchlib.memcpy_limit(nbytes, threads, repeats)
    limit_s = nbytes / benchlib.best_gbps(memcpy_gbps) / 1e9
    limit = {"limit": f"one contiguous copy, best of {'/'.join(memcpy_gbps)} with 1..{threads} threads",
             "limit_gbps": gbps(nbytes, limit_s)}
    g2 = np.ones(nbytes, np.uint8)  # contiguous G2 blocks, pre-faulted
    num_device = 2 * n
    tensors = [torch.empty(num_device, heads, page, 2 * HEAD_DIM, dtype=torch.float16) for _ in range(LAYERS)]
    fill_distinct(tensors)
    table = ns.engine_layout.bind(tensors)
    addrs = g2.ctypes.data + np.arange(n, dtype=np.uint64) * np.uint64(block)
    ids, other = block_ids(num_device, n)
    rows = []

    def row(path, direction, seconds):
        rows.append({"device": "cpu", "path": path, "direction": direction, "block_bytes": block,
                     "chunk_bytes": block // LAYERS, "bytes": nbytes, "gbps": gbps(nbytes, seconds), **limit,
                     "ratio_vs_limit": round(limit_s / seconds, 3)})

    for k in sorted({1, threads}):
        name = f"cpu_copy {k} thread{'s' if k > 1 else ''}"
        g2[:] = 0
        clear(tensors, other)
        row(name, "offload", best_s(lambda: cpu_copy.gather(table, ids, addrs, k), repeats))
        check_offload(tensors, ids, g2)
        row(name, "onboard", best_s(lambda: cpu_copy.scatter(table, other, addrs, k), repeats))
        check_onboard(tensors, ids, other)
    g2 = tensors = table = None  # free the memory before the end-to-end runs
    if e2e:
        rows += bench_cpu_e2e(ns, n, repeats, limit_s, limit)
    return {"rows": rows, "memcpy_gbps_by_threads": {kind: {k: round(v, 2) for k, v in by_threads.items()}
                                                     for kind, by_threads in memcpy_gbps.items()}}


def bench_cpu_e2e(ns: Namespace, n: int, repeats: int, limit_s: float, limit: dict) -> list[dict]:
    """The same transfer through a coordinator, worker-driven and engine-driven."""
    from kvbm_shm.client import Client
    from kvbm_shm.device.client import DeviceKv
    from kvbm_shm.device.standin import StandInKv

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from procs import CoordinatorProcess

    block = ns.kv.block_bytes
    nbytes = n * block
    num_device = 2 * n
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
                fill_distinct(kv.tensors)
                ids, other = block_ids(num_device, n)
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
                        result = dev.onboard(stored[-1], other).wait()
                        assert result.loaded == n and not result.failed, result

                    clear(kv.tensors, other)
                    for direction, fn in (("offload", offload), ("onboard", onboard)):
                        seconds = best_s(fn, repeats)
                        rows.append({"device": "cpu", "path": f"e2e_{mode}_driven", "direction": direction,
                                     "block_bytes": block, "chunk_bytes": block // LAYERS, "bytes": nbytes,
                                     "gbps": gbps(nbytes, seconds), **limit,
                                     "ratio_vs_limit": round(limit_s / seconds, 3)})
                    check_onboard(kv.tensors, ids, other)
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
    reg = HostRegistration(host.ctypes.data, nbytes, ordinal)
    engine.add_host_memory(reg)
    rows = []
    try:
        dev_ref = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        stream = cuda_driver.check(drv.cuStreamCreate(int(drv.CUstream_flags.CU_STREAM_NON_BLOCKING)), "cuStreamCreate")

        def one_copy(to_host: bool):
            dst, src = (host.ctypes.data, dev_ref.data_ptr()) if to_host else (dev_ref.data_ptr(), host.ctypes.data)
            cuda_driver.check(drv.cuMemcpyAsync(dst, src, nbytes, stream), "cuMemcpyAsync")
            cuda_driver.check(drv.cuStreamSynchronize(stream), "cuStreamSynchronize")

        limits = {True: best_s(lambda: one_copy(True), repeats), False: best_s(lambda: one_copy(False), repeats)}
        dev_ref = None
        for block_kib in GPU_BLOCK_KIB:
            heads, page = geometry(block_kib << 10)
            ns = namespace(heads, page)
            block = ns.kv.block_bytes
            n = nbytes // block
            num_device = 2 * n
            tensors = [torch.empty(num_device, heads, page, 2 * HEAD_DIM, dtype=torch.float16, device="cuda")
                       for _ in range(LAYERS)]
            fill_distinct(tensors)
            table = ns.engine_layout.bind(tensors)
            ids, other = block_ids(num_device, n)
            addrs = host.ctypes.data + np.arange(n, dtype=np.uint64) * np.uint64(block)
            for path in PATHS:
                host[:n * block] = 0
                clear(tensors, other)
                torch.cuda.synchronize()  # torch's stream is not the engine's: the fills land first
                for direction, to_host in (("offload", True), ("onboard", False)):
                    if to_host:
                        seconds = best_s(lambda: engine.gather(table, ids, addrs, path), repeats)
                        check_offload(tensors, ids, host[:n * block])
                    else:
                        seconds = best_s(lambda: engine.scatter(table, other, addrs, path), repeats)
                        check_onboard(tensors, ids, other)
                    rows.append({"device": "gpu", "path": path, "direction": direction, "block_bytes": block,
                                 "chunk_bytes": block // LAYERS, "bytes": n * block, "gbps": gbps(n * block, seconds),
                                 "limit": "cuMemcpyAsync 1 copy", "limit_gbps": gbps(nbytes, limits[to_host]),
                                 "ratio_vs_limit": round((limits[to_host] / nbytes) / (seconds / (n * block)), 3)})
            del tensors
            torch.cuda.empty_cache()
        calibration = engine.calibrate()
        kernel_unusable = engine.kernel.reason
        cuda_driver.check(drv.cuStreamDestroy(stream), "cuStreamDestroy")
    finally:
        engine.remove_host_memory(reg)
        reg.close()
        engine.close()
        host = None  # drop the view before unmapping
        host_map.close()
    return {"rows": rows, "calibration": calibration, "kernel_unusable": kernel_unusable, "import_ms": bench_import()}


def _import_child(conn) -> None:
    """Import each handle the parent sends; answer the milliseconds the open took, the device (driver,
    context) initialised beforehand so that only the import is timed."""
    import msgspec

    from kvbm_shm import protocol as p
    from kvbm_shm.device.ipc import HandleCache

    cache = HandleCache()
    decoder = msgspec.msgpack.Decoder(p.TensorHandle)
    while (body := conn.recv()) is not None:
        handle = decoder.decode(body)
        cuda_driver.use_device(cuda_driver.device_by_uuid(handle.memory.device_uuid))
        t0 = time.perf_counter()
        cache.open(handle)
        conn.send(round((time.perf_counter() - t0) * 1e3, 3))
        cache.release(handle)


def bench_import() -> dict:
    """Time for another process to import a legacy handle and a VMM (2 x 32 MiB pieces) handle."""
    import msgspec

    from kvbm_shm.device.ipc import export_tensors

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
    if report.get("memcpy_gbps_by_threads"):
        print("memcpy GB/s by threads (the CPU limit is the best):", json.dumps(report["memcpy_gbps_by_threads"]))
    if report.get("kernel_unusable"):
        print("GPU copy kernel unusable, kernel rows ran DMA:", report["kernel_unusable"])
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
        cpu = bench_cpu(args.gib, args.repeats, not args.no_e2e)
        report["rows"] += cpu["rows"]
        report["memcpy_gbps_by_threads"] = cpu["memcpy_gbps_by_threads"]
    if cuda_driver.gpu_available() and torch.cuda.is_available():
        report["machine"] += f", {torch.cuda.get_device_name()}"
        gpu = bench_gpu(args.gib, args.repeats)
        report["rows"] += gpu["rows"]
        for key in ("calibration", "kernel_unusable", "import_ms"):
            report[key] = gpu[key]
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
