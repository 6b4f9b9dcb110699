"""Disk tier benchmark: write-back and staging of 1 GiB of blocks through the NVMe I/O workers,
held against the very requests the workers issued, replayed raw on a file in the same state, in
the same run.

    python tools/bench_disk.py [--dir DIR] [--gib 1] [--block-kib 2048] [--rounds 5]
                               [--io-workers 2] [--io-threads 4] [--json]

The limit replays the tier's requests without the service: one O_DIRECT `pwritev`/`preadv` of
[4 KiB header page, block] per slot, the slots in the order the tier took them (writes: the
order of the generations stamped in the tier's slot headers; reads: the lookup's order), cut
into the tier's jobs (`job_blocks`), as many processes as I/O workers, each taking the next job
when its last one is done (the coordinator deals a lookup's jobs in turn and hands write-back
jobs out as jobs finish; taking the next is never slower) and running it on as many threads as
a worker (`pool.map` over the job: the next job waits for its last block, as in the worker);
header pages from anonymous memory and each block from its own page-aligned stretch of a
shared-memory segment, as the G2 blocks are. Writes go to a twin of the tier's G3 file
(`BlockFile.create`, same geometry, same directory: freshly pre-allocated, as the tier's file is
when the tier writes it); reads read the tier's own G3 file, its slots written by the tier, and
are checked bit for bit against the engine's blocks.

Each round, on a fresh G3 file:
1. write: a coordinator (`kvbm-shm serve`, G2 and G3 large enough for N blocks, low watermark
   1.0) and this process as the engine. The engine stores N blocks (untimed) and looks them up
   once, so that they pass admission; one Allocate then starts write-back, and the clock runs
   until the coordinator reports N blocks written. The limit writes the twin file.
2. read: the coordinator is stopped (G2 goes, G3 stays) and started again (its G3 index is
   rebuilt from the slot headers: "restart_s"). One Lookup of the N hashes is timed: every block
   is read into G2 and verified (slot header, xxh3 of the bytes) before the reply. The engine
   then loads the N blocks (untimed) and checks them bit for bit against what it stored. The
   limit reads the tier's file.
The tier goes first in odd rounds and the limit in even ones (a limit that writes first replays
the order the previous round's tier write took), each phase after `settle`; one pass each, since a
second pass would find the file in another state (its extents written). Disk throughput on a
shared machine drifts, so the summary takes medians: GB/s of each side, and ratios of the two
sides of each round (adjacent in time). GB/s count block bytes only (10^9 bytes per second; the
4 KiB slot headers are overhead on both sides). `ratio_vs_limit` = min(write ratio, read ratio);
target >= 0.8; above 1.0 the limit is not the tier's pattern.

Buffered I/O fails the benchmark: after each tier phase the flags of the I/O workers' open G3
file (/proc/PID/fdinfo) must carry O_DIRECT (a worker that fell back, at open or mid-run, holds
it without), and the limit refuses to run where O_DIRECT is refused.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import mmap
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchlib  # noqa: F401  (puts the repo on sys.path)
import numpy as np
import zmq

from kvbm_shm import Client, EngineLayout, KvLayout, Namespace, protocol as p, runtime
from kvbm_shm.disk import format as g3
from kvbm_shm.config import default_disk_dir
from kvbm_shm.control.disk_tier import MAX_WINDOW, job_blocks
from kvbm_shm.hashing import sequence_hashes
from kvbm_shm.shm import PAGE, PoolSegment, round_up

LAYERS, PAGE_TOKENS = 32, 16  # geometry of the benchmark's blocks: inner dim follows from --block-kib


def settle() -> None:
    """Before each timed phase: dirty pages written out and a moment for the device to drain, so a
    phase does not pay for the one before it."""
    os.sync()
    time.sleep(0.5)


class Limit:
    """The tier's requests issued raw: `seconds(path, jobs, write)` replays `jobs` (lists of
    (slot, block) pairs) on `path` with O_DIRECT, between its slots and the blocks of `blocks`, a
    shared-memory segment of N page-aligned blocks (the engine's bytes: what a write sends, where
    a read lands)."""

    def __init__(self, engine: "Engine", processes: int, threads: int):
        self.block_bytes = engine.namespace.kv.block_bytes
        self.stride = round_up(self.block_bytes)
        self.processes, self.threads = processes, threads
        n = len(engine.hashes)
        name = f"/dev/shm/kvbm-bench-limit-{os.getpid()}"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, n * self.stride)
            self.blocks = mmap.mmap(fd, n * self.stride)
        finally:
            os.close(fd)
            os.unlink(name)
        self.view = np.frombuffer(self.blocks, np.uint8).reshape(n, self.stride)
        self.expected = engine.kv.view(np.uint8).reshape(n, self.block_bytes)

    def load_engine_blocks(self) -> None:
        self.view[:, :self.block_bytes] = self.expected

    def clear(self) -> None:
        self.view[:] = 0

    def holds_engine_blocks(self) -> bool:
        return bool(np.array_equal(self.view[:, :self.block_bytes], self.expected))

    def seconds(self, path: Path, jobs: list[list[tuple[int, int]]], write: bool) -> float:
        ctx = mp.get_context("fork")  # the children share `blocks`
        start, done = ctx.Barrier(self.processes + 1), ctx.Barrier(self.processes + 1)
        next_job = ctx.Value("i", 0)
        procs = [ctx.Process(target=self._process, args=(path, jobs, next_job, write, start, done))
                 for _ in range(self.processes)]
        for proc in procs:
            proc.start()
        try:
            start.wait()  # every process has opened the file
            t0 = time.perf_counter()
            done.wait()
            seconds = time.perf_counter() - t0
        except threading.BrokenBarrierError:
            seconds = None
        for proc in procs:
            proc.join()
        if seconds is None or any(proc.exitcode for proc in procs):
            raise SystemExit(f"the limit's O_DIRECT I/O on {path} failed (see above): no limit, no benchmark")
        return seconds

    def _process(self, path: Path, jobs, next_job, write: bool, start, done) -> None:
        slot_bytes = g3.slot_bytes_for(self.block_bytes)
        try:
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)  # EINVAL where O_DIRECT is refused
            headers = mmap.mmap(-1, max(map(len, jobs)) * PAGE)
            io = os.pwritev if write else os.preadv

            def one(job, i: int) -> None:
                slot, block = job[i]
                parts = [memoryview(headers)[i * PAGE:(i + 1) * PAGE],
                         memoryview(self.blocks)[block * self.stride:(block + 1) * self.stride]]
                got = io(fd, parts, g3.slot_offset(slot, slot_bytes))
                if got != slot_bytes:
                    raise OSError(f"slot {slot}: {got} of {slot_bytes} bytes")

            with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
                start.wait()
                while True:
                    with next_job.get_lock():
                        k = next_job.value
                        next_job.value += 1
                    if k >= len(jobs):
                        break
                    list(pool.map(lambda i: one(jobs[k], i), range(len(jobs[k]))))
            os.close(fd)
            done.wait()
        except BaseException:
            start.abort()
            done.abort()
            raise


def in_jobs(items: list[tuple[int, int]], slot_bytes: int) -> list[list[tuple[int, int]]]:
    """`items` cut into the tier's I/O jobs."""
    per_job = job_blocks(slot_bytes)
    return [items[s:s + per_job] for s in range(0, len(items), per_job)]


def tier_slots(path: Path, hashes: list[bytes]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """What the tier did with the G3 file at `path`, from its slot headers: (slot, engine block)
    in the order it wrote them (by generation) and in the order a lookup of `hashes` reads them."""
    f = g3.BlockFile.open(path)
    try:
        headers, _ = f.read_slot_headers(0, f.num_slots)
    finally:
        f.close()
    block_of = {h: i for i, h in enumerate(hashes)}
    written = sorted((int(headers[s]["generation"]), s, block_of[bytes(headers[s]["hash"])])
                     for s in range(len(headers)) if bytes(headers[s]["magic"]) == g3.SLOT_MAGIC)
    if sorted(b for _, _, b in written) != list(range(len(hashes))):
        raise SystemExit(f"{path} does not hold each of the {len(hashes)} blocks once")
    slot_of = {b: s for _, s, b in written}
    return [(s, b) for _, s, b in written], [(slot_of[b], b) for b in range(len(hashes))]


def check_direct(coordinator_pid: int, path: Path) -> None:
    """Stop the benchmark unless every I/O worker of the coordinator that holds `path` open holds
    it with O_DIRECT (and at least one does)."""
    target, flags = os.path.realpath(path), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != coordinator_pid:
                continue
            for fd in (stat.parent / "fd").iterdir():
                if os.readlink(fd) == target:
                    info = (stat.parent / "fdinfo" / fd.name).read_text()
                    flags.append(int(info.split("flags:")[1].split()[0], 8) & os.O_DIRECT != 0)
        except (OSError, ValueError, IndexError):  # a process that exited while we looked
            continue
    if not flags or not all(flags):
        raise SystemExit(f"the disk tier's I/O workers hold {path} with buffered I/O ({flags.count(False)} of "
                         f"{len(flags)} open files without O_DIRECT): its figures cannot be held against the "
                         "O_DIRECT limit")


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


def wait_written(events: zmq.Socket, n: int, timeout_s: float = 300) -> None:
    """Until the coordinator has announced n blocks stored on disk (KV events: no polling load)."""
    seen = 0
    while seen < n:
        if not events.poll(timeout_s * 1000):
            raise RuntimeError(f"only {seen} of {n} blocks were written back within {timeout_s} s")
        batch = p.decode_events(events.recv_multipart())
        seen += sum(len(e.hashes) for e in batch.events if isinstance(e, p.BlockStored) and e.tier == p.Tier.DISK)


class Engine:
    """This process as the engine: N random blocks in one block-major tensor."""

    def __init__(self, num_blocks: int, block_bytes: int):
        inner, rest = divmod(block_bytes, LAYERS * 2 * PAGE_TOKENS * 2)
        if rest or inner < 1:
            raise SystemExit(f"--block-kib must be a multiple of {LAYERS * 2 * PAGE_TOKENS * 2 // 1024}")
        shape = (num_blocks, LAYERS, 2, PAGE_TOKENS, inner)
        self.kv = np.random.default_rng(0).integers(0, 2**16, shape, np.uint16).view(np.float16)
        self.namespace = Namespace("bench-disk", KvLayout(LAYERS, 2, PAGE_TOKENS, inner, "float16"),
                                   EngineLayout.of([self.kv]))
        self.hashes = sequence_hashes(np.arange(num_blocks * PAGE_TOKENS) % 50000, PAGE_TOKENS)
        self.pool_bytes = PoolSegment.size_for(num_blocks + 1, block_bytes) + PAGE  # a spare block: the trigger


def one_round(args: argparse.Namespace, engine: Engine, limit: Limit, work: Path, run_dir: Path, instance: str,
              tier_first: bool, write_order: list[tuple[int, int]] | None) -> tuple[dict, list[tuple[int, int]]]:
    """One round; returns its figures and the order the tier wrote its slots in."""
    n, block_bytes = len(engine.hashes), engine.namespace.kv.block_bytes
    total, slot_bytes = n * block_bytes, g3.slot_bytes_for(block_bytes)
    g3_path = work / instance / g3.file_name(engine.namespace.fingerprint)
    twin = work / "limit.blocks"
    disk_bytes = g3.file_bytes(n, block_bytes) + 2 * PAGE
    serve_args = ["--cpu-cache-gb", repr(engine.pool_bytes / 2**30 + 0.01), "--disk-cache-gb",
                  repr(disk_bytes / 2**30), "--disk-dir", str(work), "--disk-io-workers", str(args.io_workers)]
    env = {"KVBM_DISK_LOW_WATERMARK": "1.0", "KVBM_DISK_IO_THREADS": str(args.io_threads)}
    log_path = run_dir / f"{instance}.log"
    out: dict = {}

    def limit_write() -> None:
        limit.load_engine_blocks()
        settle()
        out["raw_write_gbps"] = total / limit.seconds(twin, in_jobs(write_order, slot_bytes), write=True) / 1e9

    def limit_read() -> None:
        limit.clear()
        settle()
        out["raw_read_gbps"] = total / limit.seconds(g3_path, in_jobs(read_order, slot_bytes), write=False) / 1e9
        out["limit_identical"] = limit.holds_engine_blocks()

    coordinator = Coordinator(instance, run_dir, log_path, serve_args, env)
    try:
        with Client(instance=instance, runtime_dir=run_dir, timeout_s=120) as client:
            pool = client.register_layout(engine.namespace, engine.pool_bytes)  # creates the G3 file
            tier_file = g3.BlockFile.open(g3_path)
            tier_file.close()
            g3.BlockFile.create(twin, fingerprint=engine.namespace.fingerprint, namespace=b"",
                                block_bytes=block_bytes, num_slots=tier_file.num_slots)[0].close()
            bound = pool.bind([engine.kv])
            for start in range(0, n, 64):
                ids = list(range(start, min(start + 64, n)))
                client.store(bound, [engine.hashes[i] for i in ids], ids)
            if not tier_first:
                limit_write()
            with zmq.Context() as ctx, ctx.socket(zmq.SUB) as events:
                events.connect(client.events_endpoint)
                events.subscribe(p.EVENTS_TOPIC)
                time.sleep(0.2)  # let the subscription reach the publisher
                trigger = sequence_hashes([1, 2, 3] * PAGE_TOKENS, PAGE_TOKENS)[:1]
                settle()
                t0 = time.perf_counter()  # blocks are admitted only now: no write-back starts before the clock
                assert len(client.lookup(pool, engine.hashes)) == n  # the second use: admitted
                reply = client.request(p.Allocate(req=0, lease=client.lease, pool_id=pool.pool_id, hashes=trigger))
                wait_written(events, n)
                out["write_gbps"] = total / (time.perf_counter() - t0) / 1e9
            check_direct(coordinator.proc.pid, g3_path)
            client.request(p.Free(req=0, lease=client.lease, pool_id=pool.pool_id, block_ids=reply.block_ids))
    finally:
        coordinator.stop()
    tier_order, read_order = tier_slots(g3_path, engine.hashes)
    if tier_first:
        write_order = tier_order
        limit_write()

    if not tier_first:
        limit_read()
    t0 = time.perf_counter()
    coordinator = Coordinator(instance, run_dir, log_path, serve_args, env)
    out["restart_s"] = time.perf_counter() - t0
    try:
        with Client(instance=instance, runtime_dir=run_dir, timeout_s=120) as client:
            pool = client.register_layout(engine.namespace, engine.pool_bytes)
            settle()
            t0 = time.perf_counter()
            reply = client.request(p.Lookup(req=0, lease=client.lease, pool_id=pool.pool_id, hashes=engine.hashes))
            out["read_gbps"] = total / (time.perf_counter() - t0) / 1e9
            assert reply.tiers == [p.Tier.DISK] * n, f"staged {reply.tiers.count(p.Tier.DISK)} of {n}"
            check_direct(coordinator.proc.pid, g3_path)
            loaded = np.zeros_like(engine.kv)
            got = client.load(pool.bind([loaded]), engine.hashes, list(range(n)))
            out["identical"] = got.loaded == n and bool(np.array_equal(loaded.view(np.uint16),
                                                                        engine.kv.view(np.uint16)))
    finally:
        coordinator.stop()
    if tier_first:
        limit_read()
    out["write_ratio"] = out["write_gbps"] / out["raw_write_gbps"]
    out["read_ratio"] = out["read_gbps"] / out["raw_read_gbps"]
    return out, tier_order


FIGURES = ("raw_write_gbps", "write_gbps", "write_ratio", "raw_read_gbps", "read_gbps", "read_ratio", "restart_s")


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    block_bytes = args.block_kib * 1024
    n = int(args.gib * 2**30) // block_bytes
    if n > MAX_WINDOW:
        raise SystemExit(f"{n} blocks: write-back looks at most {MAX_WINDOW} blocks ahead of eviction; "
                         "use larger --block-kib or a smaller --gib")
    engine = Engine(n, block_bytes)
    limit = Limit(engine, args.io_workers, args.io_threads)
    rounds, write_order = [], None
    for r in range(args.rounds):
        work = Path(tempfile.mkdtemp(prefix="kvbm-bench-", dir=args.dir))
        run_dir = Path(tempfile.mkdtemp(prefix="kvb", dir="/tmp"))  # short: ipc:// paths are limited
        try:
            figures, write_order = one_round(args, engine, limit, work, run_dir, f"bench{os.getpid()}r{r}",
                                             tier_first=r % 2 == 0, write_order=write_order)
            rounds.append({"round": r + 1, "first": "tier" if r % 2 == 0 else "limit", **figures})
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)
    med = {k: round(statistics.median(r[k] for r in rounds), 3) for k in FIGURES}
    summary = {
        "dir": args.dir, "block_bytes": block_bytes, "num_blocks": n, "bytes": n * block_bytes,
        "io_workers": args.io_workers, "io_threads": args.io_threads,
        "queue_depth": args.io_workers * args.io_threads,
        "identical": all(r["identical"] and r["limit_identical"] for r in rounds),
        **med, "ratio_vs_limit": min(med["write_ratio"], med["read_ratio"]),
    }
    for r in rounds:
        for k in FIGURES:
            r[k] = round(r[k], 2)
        del r["identical"], r["limit_identical"]
    return rounds, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=str(default_disk_dir()), help="disk directory (default: the G3 default)")
    parser.add_argument("--gib", type=float, default=1.0, help="GiB of blocks (default 1)")
    parser.add_argument("--block-kib", type=int, default=2048, help="block size in KiB (default 2048)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, tier and limit first in turn; medians reported")
    parser.add_argument("--io-workers", type=int, default=2)
    parser.add_argument("--io-threads", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    rounds, summary = run(args)
    title = (f"disk tier: {summary['num_blocks']} blocks of {summary['block_bytes'] / 2**20:g} MiB through "
             f"{args.io_workers} I/O workers x {args.io_threads} threads (O_DIRECT) vs its own requests replayed "
             f"raw at queue depth {summary['queue_depth']}, GB/s, in {args.dir}")
    benchlib.report(title, ["round", "first", *FIGURES], rounds, summary, args.json)
    return 0 if summary["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
