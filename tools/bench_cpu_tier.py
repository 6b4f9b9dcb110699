"""Benchmark: store and load of scattered KV blocks through the CPU tier (G2), engine-driven.

An engine with vLLM's CPU layout (one fp16 tensor per layer, `(num_blocks, heads, page, 2*head)`,
so a 2 MiB block is 32 chunks of 64 KiB) stores `--gib` of blocks at scattered device block ids
through a running coordinator (`Client.store`: allocate, copy, checksum, commit), then another
set of device blocks loads them back (`Client.load`: pin, verify, copy, release). Beside them, in
the same run:

- the physical limit: a copy of the same number of bytes between pre-faulted buffers with 1..N
  threads, N being the copy threads the client uses (`copy_threads`), with glibc's memmove and
  with the copy engine's non-temporal stores; the best of them is the limit (`ratio_vs_limit` = the slower of store and load / that limit; target >= 0.7);
- Redis on loopback (when `redis-server` is installed and the `bench` extra is: `apt-get install
  redis-server`, `pip install -e '.[bench]'`): the same blocks gathered into one buffer each and
  SET in a pipeline, then GET and scattered back (`ratio_vs_redis` = the lower of store/SET and
  load/GET; target >= 10). That is the store peers put behind their CPU tier.

Every loaded block is compared with the block stored from, bit for bit.

    python tools/bench_cpu_tier.py [--gib 1] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import socket
import subprocess
import time

import benchlib
import numpy as np
import torch

from kvbm_shm import Client, ClientConfig, EngineLayout, KvLayout, Namespace
from kvbm_shm.hashing import sequence_hashes
from kvbm_shm.kernels import cpu_copy
from kvbm_shm.shm import PoolSegment

LAYERS, HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16  # fp16: 64 KiB per layer and block, 2 MiB per block


best_s = benchlib.best_s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_redis(table, src_ids, dst_table, dst_ids, block_bytes: int, repeats: int) -> tuple[float, float] | None:
    if shutil.which("redis-server") is None or importlib.util.find_spec("redis") is None:
        return None
    import redis

    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--maxmemory", "0"], stdout=subprocess.DEVNULL)
    try:
        r = redis.Redis(port=port)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        buf = np.empty(block_bytes, np.uint8)
        addr = np.array([buf.ctypes.data], np.uint64)

        def store():
            pipe = r.pipeline(transaction=False)
            for i, b in enumerate(src_ids):
                cpu_copy.gather(table, [b], addr)
                pipe.set(f"blk{i}", buf.tobytes())
                if i % 16 == 15:
                    pipe.execute()
            pipe.execute()

        def load():
            for start in range(0, len(dst_ids), 16):
                values = r.mget([f"blk{i}" for i in range(start, min(start + 16, len(dst_ids)))])
                for i, v in enumerate(values):
                    data = np.frombuffer(v, np.uint8)
                    cpu_copy.scatter(dst_table, [dst_ids[start + i]], np.array([data.ctypes.data], np.uint64))

        return best_s(store, repeats, r.flushall), best_s(load, repeats)
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-redis", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    kv_shape = (HEADS, PAGE, 2 * HEAD_DIM)
    probe = [torch.empty(1, *kv_shape, dtype=torch.float16) for _ in range(LAYERS)]
    ns = Namespace("bench-cpu-tier", KvLayout(LAYERS, 2, PAGE, HEADS * HEAD_DIM, "float16"), EngineLayout.of(probe))
    block = ns.kv.block_bytes
    n = int(args.gib * (1 << 30)) // block
    nbytes = n * block
    rng = np.random.default_rng(0)
    device_blocks = n * 3 // 2
    src = [torch.randn(device_blocks, *kv_shape).to(torch.float16) for _ in range(LAYERS)]
    dst = [torch.zeros(device_blocks, *kv_shape, dtype=torch.float16) for _ in range(LAYERS)]
    src_ids = rng.choice(device_blocks, n, replace=False).tolist()
    dst_ids = rng.choice(device_blocks, n, replace=False).tolist()
    threads = ClientConfig().copy_threads
    memcpy_gbps = benchlib.memcpy_limit(nbytes, threads, args.repeats)
    cache_gb = PoolSegment.size_for(n, block) / 2**30 + 0.01
    rows = []
    with benchlib.coordinator(cache_gb, "--transfer-workers", "0") as (instance, runtime_dir):
        with Client(instance=instance, runtime_dir=runtime_dir, name="bench") as client:
            pool = client.register_layout(ns)
            src_kv, dst_kv = pool.bind(src), pool.bind(dst)
            rounds = iter(range(1_000_000))
            hashes: list[bytes] = []

            def fresh_hashes():
                hashes[:] = sequence_hashes(np.arange(n * PAGE) + next(rounds) * n * PAGE, PAGE)

            def store():
                assert client.store(src_kv, hashes, src_ids).stored == n

            store_s = best_s(store, args.repeats, fresh_hashes)

            def load():
                assert client.load(dst_kv, hashes, dst_ids).loaded == n

            load_s = best_s(load, args.repeats)
            identical = all(torch.equal(s[i], d[j]) for s, d in zip(src, dst) for i, j in zip(src_ids, dst_ids))
            table, dst_table = src_kv.chunks, dst_kv.chunks
    for kind, by_threads in memcpy_gbps.items():
        for t, gbps in by_threads.items():
            rows.append({"path": f"copy limit: {kind} x{t}", "store_GBps": round(gbps, 2), "load_GBps": round(gbps, 2)})
    limit = benchlib.best_gbps(memcpy_gbps)
    rows.append({"path": f"kvbm-shm G2 (checksummed, {threads} copy threads)",
                 "store_GBps": round(nbytes / store_s / 1e9, 2), "load_GBps": round(nbytes / load_s / 1e9, 2)})
    summary = {"bytes": nbytes, "block_bytes": block, "blocks": n, "copy_threads": threads,
               "limit_GBps": round(limit, 2), "identical": identical,
               "ratio_vs_limit": round(nbytes / max(store_s, load_s) / 1e9 / limit, 2)}
    redis_s = None if args.no_redis else bench_redis(table, src_ids, dst_table, dst_ids, block, args.repeats)
    if redis_s is not None:
        rows.append({"path": "redis SET / GET (loopback)", "store_GBps": round(nbytes / redis_s[0] / 1e9, 2),
                     "load_GBps": round(nbytes / redis_s[1] / 1e9, 2)})
        summary["ratio_vs_redis"] = round(min(redis_s[0] / store_s, redis_s[1] / load_s), 1)
    else:
        summary["ratio_vs_redis"] = None
    summary["targets"] = "ratio_vs_limit >= 0.7; ratio_vs_redis >= 10"
    benchlib.report("bench_cpu_tier: 1 GiB of scattered 2 MiB blocks", ["path", "store_GBps", "load_GBps"],
                    rows, summary, args.json)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
