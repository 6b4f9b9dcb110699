"""Disk tier benchmark: write-back and staging of 1 GiB of blocks through the NVMe I/O workers,
held against dd with O_DIRECT, with the same block size, in the same directory, in the same run.

    python tools/bench_disk.py [--dir DIR] [--gib 1] [--block-kib 2048]
                               [--io-workers 2] [--io-threads 4] [--json]

1. The limit: `dd if=/dev/zero of=DIR/dd.bin bs=BLOCK count=N oflag=direct`, then read it back
   with `iflag=direct`.
2. Write-back: a coordinator (`kvbm-shm serve`, G2 and G3 large enough for N blocks, low watermark
   1.0) and this process as the engine. The engine stores N blocks (untimed) and looks them up
   once, so that they pass admission; one Allocate then starts write-back, and the clock runs
   until the coordinator reports N blocks written (slot header + block per pwritev, O_DIRECT).
3. Staging: the coordinator is stopped (G2 goes, G3 stays) and started again (its G3 index is
   rebuilt from the slot headers: "restart"). One Lookup of the N hashes is timed: every block is
   read into G2 and verified (header and xxh3 of the bytes) before the reply.
4. The engine loads the N blocks (untimed) and checks them bit for bit against what it stored.

GB/s count block bytes only (10^9 bytes per second; the 4 KiB slot headers are overhead).
`ratio_vs_limit` is the lower of write/dd-write and read/dd-read; the target is at least 0.8.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kvbm_shm import Client, EngineLayout, KvLayout, Namespace, g3, protocol as p, runtime
from kvbm_shm.config import default_disk_dir
from kvbm_shm.hashing import sequence_hashes
from kvbm_shm.shm import PAGE, PoolSegment

LAYERS, PAGE_TOKENS = 32, 16  # geometry of the benchmark's blocks: inner dim follows from --block-kib


def dd(args: list[str]) -> float:
    """Run dd; seconds it reports."""
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    return float(re.search(r"copied, ([0-9.e+-]+) s", out).group(1))


class Coordinator:
    """A `kvbm-shm serve` process of the benchmark's instance."""

    def __init__(self, instance: str, runtime_dir: Path, log_path: Path, args: list[str], env: dict):
        self.instance_dir = runtime_dir / instance
        self.log_path = log_path
        cmd = [sys.executable, "-m", "kvbm_shm", "serve", "--instance", instance, "--runtime-dir", str(runtime_dir),
               *args]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = runtime.read_info(self.instance_dir) if self.instance_dir.exists() else None
            if info is not None and info.pid == self.proc.pid:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"the coordinator did not start:\n{log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def written(client: Client) -> int:
    return sum(d.counters.get("written_blocks", 0) for d in client.stats().disks)


def run(args: argparse.Namespace) -> dict:
    block_bytes = args.block_kib * 1024
    inner, rest = divmod(block_bytes, LAYERS * 2 * PAGE_TOKENS * 2)
    if rest or inner < 1:
        raise SystemExit(f"--block-kib must be a multiple of {LAYERS * 2 * PAGE_TOKENS * 2 // 1024}")
    n = int(args.gib * 2**30) // block_bytes
    work = Path(tempfile.mkdtemp(prefix="kvbm-bench-", dir=args.dir))
    run_dir = Path(tempfile.mkdtemp(prefix="kvb", dir="/tmp"))  # short: ipc:// paths are limited
    instance = f"bench{os.getpid()}"
    try:
        # 1. the limit, same directory, same block size
        dd_file = work / "dd.bin"
        dd_write_s = dd(["if=/dev/zero", f"of={dd_file}", f"bs={block_bytes}", f"count={n}", "oflag=direct"])
        dd_read_s = dd([f"if={dd_file}", "of=/dev/null", f"bs={block_bytes}", "iflag=direct"])
        dd_file.unlink()

        # 2. write-back through the I/O workers
        pool_bytes = PoolSegment.size_for(n + 1, block_bytes) + PAGE  # one spare block for the trigger
        disk_bytes = g3.file_bytes(n, block_bytes) + 2 * PAGE
        serve_args = ["--cpu-cache-gb", repr(pool_bytes / 2**30 + 0.01), "--disk-cache-gb", repr(disk_bytes / 2**30),
                      "--disk-dir", str(work), "--disk-io-workers", str(args.io_workers)]
        env = {"KVBM_DISK_LOW_WATERMARK": "1.0", "KVBM_DISK_IO_THREADS": str(args.io_threads)}
        log_path = run_dir / "coordinator.log"
        kv = np.random.default_rng(0).integers(0, 2**16, (n, LAYERS, 2, PAGE_TOKENS, inner), np.uint16)
        kv = kv.view(np.float16)
        namespace = Namespace("bench-disk", KvLayout(LAYERS, 2, PAGE_TOKENS, inner, "float16"), EngineLayout.of([kv]))
        hashes = sequence_hashes(np.arange(n * PAGE_TOKENS) % 50000, PAGE_TOKENS)
        coordinator = Coordinator(instance, run_dir, log_path, serve_args, env)
        try:
            with Client(instance=instance, runtime_dir=run_dir, timeout_s=120) as client:
                pool = client.register_layout(namespace, pool_bytes)
                bound = pool.bind([kv])
                for start in range(0, n, 64):
                    ids = list(range(start, min(start + 64, n)))
                    client.store(bound, [hashes[i] for i in ids], ids)
                assert len(client.lookup(pool, hashes)) == n  # the second use: admitted
                trigger = sequence_hashes([1, 2, 3] * PAGE_TOKENS, PAGE_TOKENS)[:1]
                t0 = time.perf_counter()
                reply = client.request(p.Allocate(0, client.client_id, pool.pool_id, trigger))
                while written(client) < n:
                    time.sleep(0.002)
                write_s = time.perf_counter() - t0
                client.request(p.Free(0, client.client_id, pool.pool_id, reply.block_ids))
        finally:
            coordinator.stop()

        # 3. restart (G3 index rebuilt from the headers), then stage everything back
        t0 = time.perf_counter()
        coordinator = Coordinator(instance, run_dir, log_path, serve_args, env)
        restart_s = time.perf_counter() - t0
        try:
            with Client(instance=instance, runtime_dir=run_dir, timeout_s=120) as client:
                pool = client.register_layout(namespace, pool_bytes)
                t0 = time.perf_counter()
                reply = client.request(p.Lookup(0, client.client_id, pool.pool_id, hashes))
                read_s = time.perf_counter() - t0
                assert reply.tiers == [p.Tier.DISK] * n, f"staged {reply.tiers.count(p.Tier.DISK)} of {n}"
                # 4. bit for bit
                out = np.zeros_like(kv)
                loaded = client.load(pool.bind([out]), hashes, list(range(n)))
                identical = loaded.loaded == n and bool(np.array_equal(out.view(np.uint16), kv.view(np.uint16)))
        finally:
            coordinator.stop()
        log = log_path.read_text()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)

    total = n * block_bytes
    result = {
        "dir": str(args.dir), "block_bytes": block_bytes, "num_blocks": n, "bytes": total,
        "io_workers": args.io_workers, "io_threads": args.io_threads,
        "direct_io": "refuses O_DIRECT" not in log,
        "dd_write_gbps": total / dd_write_s / 1e9, "dd_read_gbps": total / dd_read_s / 1e9,
        "write_gbps": total / write_s / 1e9, "read_gbps": total / read_s / 1e9,
        "restart_s": restart_s, "identical": identical,
    }
    result["write_ratio"] = result["write_gbps"] / result["dd_write_gbps"]
    result["read_ratio"] = result["read_gbps"] / result["dd_read_gbps"]
    result["ratio_vs_limit"] = min(result["write_ratio"], result["read_ratio"])
    return result


def print_table(r: dict) -> None:
    print(f"disk tier: {r['num_blocks']} blocks of {r['block_bytes'] / 2**20:.2f} MiB ({r['bytes'] / 2**30:.2f} GiB) "
          f"in {r['dir']}; {r['io_workers']} I/O workers x {r['io_threads']} threads; "
          f"{'O_DIRECT' if r['direct_io'] else 'buffered I/O'}")
    print(f"{'':34}{'GB/s':>8}{'vs dd':>8}")
    print(f"{'dd O_DIRECT write':34}{r['dd_write_gbps']:8.2f}")
    print(f"{'dd O_DIRECT read':34}{r['dd_read_gbps']:8.2f}")
    print(f"{'write-back G2 -> G3 (workers)':34}{r['write_gbps']:8.2f}{r['write_ratio']:8.2f}")
    print(f"{'staging G3 -> G2, verified':34}{r['read_gbps']:8.2f}{r['read_ratio']:8.2f}")
    print(f"ratio_vs_limit {r['ratio_vs_limit']:.2f} (target >= 0.8); restart with G3 rebuild "
          f"{r['restart_s']:.2f} s; bytes identical: {r['identical']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=str(default_disk_dir()), help="disk directory (default: the G3 default)")
    parser.add_argument("--gib", type=float, default=1.0, help="GiB of blocks (default 1)")
    parser.add_argument("--block-kib", type=int, default=2048, help="block size in KiB (default 2048)")
    parser.add_argument("--io-workers", type=int, default=2)
    parser.add_argument("--io-threads", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
