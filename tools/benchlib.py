"""Shared pieces of the benchmarks: a private coordinator, timing, and the table/JSON report.

Not installed; each benchmark imports it from tools/. A benchmark prints a table, or one JSON
object with `--json`, and always carries the physical limit it measured in the same run.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from kvbm_shm import runtime  # noqa: E402
from kvbm_shm.kernels import cpu_copy  # noqa: E402
from kvbm_shm.shm import list_segments, unlink  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


@contextlib.contextmanager
def coordinator(cpu_cache_gb: float, *extra: str):
    """A coordinator of a fresh instance in a temporary runtime dir; yields (instance, runtime_dir)."""
    instance = f"bench{uuid.uuid4().hex[:8]}"
    runtime_dir = Path(tempfile.mkdtemp(prefix="kvb", dir="/tmp"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "kvbm_shm", "serve", "--instance", instance,
                             "--runtime-dir", str(runtime_dir), "--cpu-cache-gb", str(cpu_cache_gb),
                             "--log-level", "WARNING", *extra],
                            env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while runtime.read_info(runtime_dir / instance) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the coordinator did not start")
            time.sleep(0.05)
        yield instance, runtime_dir
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        for name in list_segments(f"kvbm-{instance}-"):
            unlink(name)
        shutil.rmtree(runtime_dir, ignore_errors=True)


def best_s(fn, repeats: int, reset=None) -> float:
    """Fastest of `repeats` timed calls of `fn` (`reset` runs untimed before each)."""
    best = math.inf
    for _ in range(repeats):
        if reset is not None:
            reset()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memcpy_limit(nbytes: int, max_threads: int, repeats: int) -> dict[str, dict[int, float]]:
    """The CPU copy limit for a product that copies with up to `max_threads` threads: GB/s of one
    copy of `nbytes` between pre-faulted buffers, split over 1..max_threads threads (one contiguous
    4 KiB-aligned slice each), by glibc memmove and by the copy engine's non-temporal stores (the
    faster where caches are small; when the engine is built). `{kind: {threads: GB/s}}`; the
    honest limit is the best value of all (`best_gbps`)."""
    src, dst = np.ones(nbytes, np.uint8), np.ones(nbytes, np.uint8)
    kinds = {"memmove": ctypes.memmove}  # ctypes drops the GIL
    if cpu_copy._c is not None:
        kinds["non-temporal"] = lambda d, s, n: cpu_copy.copy_batch(*(np.array([v], np.uint64) for v in (d, s, n)))
    out: dict[str, dict[int, float]] = {}
    for kind, copy in kinds.items():
        out[kind] = {}
        for threads in range(1, max_threads + 1):
            edges = [nbytes * i // threads // 4096 * 4096 for i in range(threads)] + [nbytes]
            parts = [(dst.ctypes.data + a, src.ctypes.data + a, b - a) for a, b in zip(edges, edges[1:])]

            def copy_all():
                workers = [threading.Thread(target=copy, args=part) for part in parts]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()

            copy_all()  # warm-up
            out[kind][threads] = nbytes / best_s(copy_all, repeats) / 1e9
    return out


def best_gbps(limits: dict[str, dict[int, float]]) -> float:
    return max(v for by_threads in limits.values() for v in by_threads.values())


def percentile_us(samples_ns, q: float) -> float:
    s = sorted(samples_ns)
    return round(s[min(len(s) - 1, int(q / 100 * len(s)))] / 1000, 1)


def report(title: str, columns: list[str], rows: list[dict], summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"benchmark": title, "machine": machine(), "rows": rows, **summary}, indent=1))
        return
    print(f"{title}  ({machine()})")
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
    for k, v in summary.items():
        print(f"{k}: {v}")
