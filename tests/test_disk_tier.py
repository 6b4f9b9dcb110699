"""The disk tier end to end: a real coordinator process with its NVMe I/O worker processes, real
block files, and this test process as the engine (numpy KV tensors, the client library).

Each test tells one story: write-back under G2 pressure and a hit served from disk with
identical bytes; the admission filter keeping one-off blocks out; a flipped byte and a truncated
file treated as misses; a restart (clean or SIGKILL) finding what was stored before; an I/O worker
killed mid-write; a tiny filesystem that fills up; a filesystem that refuses O_DIRECT; a disk
directory that cannot be used.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from kvbm_shm import Client, EngineLayout, KvLayout, Namespace, protocol as p, sequence_hashes
from kvbm_shm.disk import format as g3
from kvbm_shm.shm import PoolSegment, list_segments

from .procs import CoordinatorProcess

LAYERS, HEADS, PAGE, HEAD_DIM, DEVICE_BLOCKS = 2, 2, 16, 32, 48
HASHES = sequence_hashes(list(range(DEVICE_BLOCKS * PAGE)), PAGE)
DISK_GB = "0.004"  # ~4 MiB: about 200 slots of 16 KiB blocks


class Engine:
    """An engine in this process: KV tensors whose device block i holds the block of HASHES[i]."""

    def __init__(self, instance: str, runtime_dir: Path, pool_blocks: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        shape = (DEVICE_BLOCKS, HEADS, PAGE, 2 * HEAD_DIM)
        self.kv = [rng.standard_normal(shape, dtype=np.float32) for _ in range(LAYERS)]
        self.namespace = Namespace("disk-test", KvLayout(LAYERS, 2, PAGE, HEADS * HEAD_DIM, "float32"),
                                   EngineLayout.of(self.kv))
        self.client = Client(instance=instance, runtime_dir=runtime_dir, name="engine", timeout_s=10)
        cache_bytes = PoolSegment.size_for(pool_blocks, self.namespace.kv.block_bytes) + 4096  # blocks_for's slack
        self.pool = self.client.register_layout(self.namespace, cache_bytes)
        assert self.pool.num_blocks == pool_blocks
        assert self.pool.segment.index.lower_tiers  # G3 is on: a lookup G2 answers in part asks the coordinator
        self.bound = self.pool.bind(self.kv)

    def store(self, first: int, count: int):
        ids = list(range(first, first + count))
        return self.client.store(self.bound, [HASHES[i] for i in ids], ids)

    def store_in_steps(self, first: int, count: int, step: int = 2) -> None:
        """Store a few blocks at a time, letting write-back finish in between (as a steady load does)."""
        for start in range(first, first + count, step):
            self.store(start, min(step, first + count - start))
            self.wait_disk(lambda d: d.writing == 0)

    def lookup(self, first: int, count: int) -> p.LookupReply:
        return self.client.request(p.Lookup(req=0, lease=self.client.lease, pool_id=self.pool.pool_id,
                                            hashes=HASHES[first:first + count]))

    def load(self, first: int, count: int):
        """Load into fresh tensors; returns the result and whether every loaded block is identical."""
        out = [np.zeros_like(t) for t in self.kv]
        ids = list(range(first, first + count))
        result = self.client.load(self.pool.bind(out), [HASHES[i] for i in ids], ids)
        same = all(np.array_equal(out[layer][b], self.kv[layer][b])
                   for layer in range(LAYERS) for b in ids[:result.loaded])
        return result, same

    def disk(self) -> p.DiskStats:
        (stats,) = self.client.stats().disks
        return stats

    def wait_disk(self, condition, timeout_s: float = 10.0) -> p.DiskStats:
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.disk()
            if condition(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"disk tier never reached the expected state: {stats}")
            time.sleep(0.01)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


@pytest.fixture
def disk_dir(runtime_dir) -> Path:
    path = runtime_dir / "disk"
    path.mkdir()
    return path


@pytest.fixture
def start(instance, runtime_dir, disk_dir):
    """Start coordinators with the disk tier on (KVBM_* settings as keyword arguments, `prefix`: a
    command to run it under); all are stopped at teardown, and nothing may be left in /dev/shm."""
    started: list[CoordinatorProcess] = []

    def go(*extra: str, prefix: list[str] = (), **settings) -> CoordinatorProcess:
        env = {f"KVBM_{k.upper()}": str(v) for k, v in settings.items()}
        coordinator = CoordinatorProcess(instance, runtime_dir, "--disk-cache-gb", DISK_GB, "--disk-dir",
                                         str(disk_dir), *extra, env=env)
        coordinator.args = [*prefix, *coordinator.args]
        started.append(coordinator)
        return coordinator.start()

    yield go
    for coordinator in started:
        coordinator.stop()
    left = list_segments(f"kvbm-{instance}-")
    if started:
        started[-1].remove_leftovers()
    assert not left, f"segments left in /dev/shm after the test: {left}"


@pytest.fixture
def engines():
    made: list[Engine] = []

    def make(*args, **kwargs) -> Engine:
        made.append(Engine(*args, **kwargs))
        return made[-1]

    yield make
    for engine in made:
        engine.close()


def block_file(disk_dir: Path, instance: str) -> Path:
    (path,) = (disk_dir / instance).glob("g3-v1-*.blocks")
    return path


def slot_of(path: Path, h: bytes) -> int:
    f = g3.BlockFile.open(path)
    try:
        headers, n = f.read_slot_headers(0, f.num_slots)
        return next(i for i in range(n) if bytes(headers[i]["hash"]) == h)
    finally:
        f.close()


def worker_pids(coordinator: CoordinatorProcess) -> list[int]:
    pid = coordinator.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"kvbm_shm.workers.disk_io" in Path(f"/proc/{c}/cmdline").read_bytes()]


# ---------------------------------------------------------------- the stories


def test_write_back_under_pressure_then_hit_from_disk(start, engines, instance, runtime_dir):
    start()
    engine = engines(instance, runtime_dir, pool_blocks=16)
    engine.store(0, 12)  # A: blocks 0-11
    assert len(engine.lookup(0, 12).block_ids) == 12  # reused once: A passes admission
    engine.store_in_steps(12, 12)  # B: blocks 12-23, one-offs, push A out of G2
    disk = engine.disk()
    assert disk.counters["written_blocks"] == 12 and disk.stored == 12  # all of A, none of B
    reply = engine.lookup(0, 12)  # 8 of A left G2: they come back from disk, staged into G2
    assert len(reply.tiers) == 12 and reply.tiers.count(p.Tier.DISK) == 8
    result, same = engine.load(0, 12)
    assert result.loaded == 12 and same
    assert result.tiers == [p.Tier.CPU] * 12  # staged blocks now live in G2 too
    assert engine.disk().counters["read_blocks"] == 8


def test_admission_keeps_one_off_blocks_out(start, engines, instance, runtime_dir):
    start()
    engine = engines(instance, runtime_dir, pool_blocks=8)
    engine.store_in_steps(0, 24)  # every block seen once, most of them evicted
    assert engine.disk().counters.get("written_blocks", 0) == 0
    assert engine.lookup(0, 1).block_ids == []  # a one-off that left G2 is gone
    engine.store(0, 1)  # block 0 comes back: its second use in the filter's memory
    engine.store_in_steps(24, 16)  # push it towards eviction
    disk = engine.disk()
    assert disk.counters["written_blocks"] == 1 and disk.stored == 1
    assert engine.lookup(0, 1).tiers == [p.Tier.DISK]


def test_flipped_byte_is_a_miss_and_dropped(start, engines, instance, runtime_dir, disk_dir):
    coordinator = start(disk_write_through=1)
    engine = engines(instance, runtime_dir, pool_blocks=8)
    engine.store(0, 4)
    engine.wait_disk(lambda d: d.counters.get("written_blocks", 0) == 4)
    engine.close()
    coordinator.stop()  # G2 is gone with it; G3 stays
    path = block_file(disk_dir, instance)
    with open(path, "r+b") as f:  # one bit of block 2's bytes
        f.seek(g3.slot_offset(slot_of(path, HASHES[2]), g3.slot_bytes_for(engine.namespace.kv.block_bytes))
               + g3.SLOT_HEADER_BYTES + 777)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x04]))
    coordinator = start(disk_write_through=1)
    engine = engines(instance, runtime_dir, pool_blocks=8)
    assert engine.disk().stored == 4  # the header still vouches for it: only reading finds out
    reply = engine.lookup(0, 4)
    assert reply.tiers == [p.Tier.DISK] * 2  # the prefix ends at the bad block
    disk = engine.disk()
    assert disk.counters["corrupt_blocks"] == 1 and disk.stored == 3
    result, same = engine.load(0, 4)
    assert result.loaded == 2 and same
    assert "failed verification (block bytes do not match their checksum)" in coordinator.log()


def test_truncated_file_serves_what_is_left(start, engines, instance, runtime_dir, disk_dir):
    coordinator = start(disk_write_through=1)
    engine = engines(instance, runtime_dir, pool_blocks=8)
    engine.store(0, 4)
    engine.wait_disk(lambda d: d.counters.get("written_blocks", 0) == 4)
    engine.close()
    coordinator.stop()
    path = block_file(disk_dir, instance)
    slot_bytes = g3.slot_bytes_for(engine.namespace.kv.block_bytes)
    slots = [slot_of(path, HASHES[i]) for i in range(4)]
    os.truncate(path, g3.slot_offset(slots[1], slot_bytes) + g3.SLOT_HEADER_BYTES + 100)  # into block 1's bytes
    coordinator = start(disk_write_through=1)
    engine = engines(instance, runtime_dir, pool_blocks=8)
    assert engine.lookup(0, 4).tiers == [p.Tier.DISK]
    result, same = engine.load(0, 4)
    assert result.loaded == 1 and same
    disk = engine.disk()
    assert disk.counters["corrupt_blocks"] == 1
    assert disk.counters["truncated_slots"] > 0
    assert os.path.getsize(path) == g3.file_bytes(disk.num_slots, engine.namespace.kv.block_bytes)
    engine.store(4, 4)  # and the file is usable again
    engine.wait_disk(lambda d: d.counters.get("written_blocks", 0) == 4)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_restart_finds_blocks_stored_before(how, start, engines, instance, runtime_dir, disk_dir):
    coordinator = start(disk_write_through=1)
    engine = engines(instance, runtime_dir, pool_blocks=16)
    engine.store(0, 10)
    engine.wait_disk(lambda d: d.counters.get("written_blocks", 0) == 10)
    engine.close()
    if how == "sigterm":
        coordinator.stop()
    else:
        coordinator.kill()
        coordinator.remove_leftovers()  # drop the G2 pool a killed coordinator leaves: only G3 remains
    start()
    engine = engines(instance, runtime_dir, pool_blocks=16)
    disk = engine.disk()
    assert disk.stored == 10 and disk.counters["recovered_blocks"] == 10
    assert engine.lookup(0, 12).tiers == [p.Tier.DISK] * 10
    result, same = engine.load(0, 12)
    assert result.loaded == 10 and same


def test_coordinator_killed_mid_write_never_serves_a_bad_block(start, engines, instance, runtime_dir):
    coordinator = start(disk_write_through=1)
    engine = engines(instance, runtime_dir, pool_blocks=40)
    engine.store(0, 40)
    time.sleep(0.005)  # some writes done, some in flight
    engine.close()
    coordinator.kill()
    coordinator.remove_leftovers()
    start()
    engine = engines(instance, runtime_dir, pool_blocks=40)
    stored = engine.disk().stored
    result, same = engine.load(0, 40)
    assert same  # whatever made it to disk comes back bit for bit, and nothing else
    assert result.loaded <= stored and not result.failed


def test_worker_killed_mid_write_loses_nothing_committed(start, engines, instance, runtime_dir):
    coordinator = start(disk_write_through=1, disk_io_workers=2)
    engine = engines(instance, runtime_dir, pool_blocks=24)
    engine.store(0, 4)
    engine.wait_disk(lambda d: d.counters.get("written_blocks", 0) == 4)  # committed to disk
    workers = worker_pids(coordinator)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    engine.store(4, 16)  # jobs reach the stopped workers
    disk = engine.wait_disk(lambda d: d.writing == 16)
    assert disk.stored == 4  # nothing unfinished is visible
    for pid in workers:  # whichever holds the job dies with it
        os.kill(pid, signal.SIGKILL)
    disk = engine.wait_disk(lambda d: d.stored == 20 and d.writing == 0)  # the lost job is written again
    assert disk.counters["written_blocks"] == 20
    assert "exited with -9" in coordinator.log()
    assert len(worker_pids(coordinator)) == 2  # restarted
    coordinator.stop()
    engine.close()
    start()
    engine = engines(instance, runtime_dir, pool_blocks=24)
    result, same = engine.load(0, 20)
    assert result.loaded == 20 and same and result.tiers == [p.Tier.DISK] * 20


# ---------------------------------------------------------------- filesystems


def _private_mount_prefix(fstype: str, options: str, target: Path) -> list[str]:
    """A command prefix that runs the coordinator in its own mount namespace with `target`
    mounted (the mount vanishes with the process); skips the test where that is not allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    for flags in (["-m"], ["-rm"]):
        probe = subprocess.run(["unshare", *flags, "sh", "-c", f"mount -t {fstype} {options} none {target}"],
                               capture_output=True)
        if probe.returncode == 0:
            return ["unshare", *flags, "sh", "-c", f'mount -t {fstype} {options} none {target} && exec "$@"', "sh"]
    pytest.skip(f"cannot mount {fstype} in a private mount namespace here")


def test_tiny_filesystem_fills_up(start, engines, instance, runtime_dir, disk_dir):
    coordinator = start(prefix=_private_mount_prefix("tmpfs", "-o size=512k", disk_dir), disk_write_through=1)
    engine = engines(instance, runtime_dir, pool_blocks=40)
    engine.store(0, 40)  # 40 slots of 20 KiB do not fit in 512 KiB
    disk = engine.wait_disk(lambda d: d.writing == 0 and d.counters.get("written_blocks", 0)
                            + d.counters.get("no_space_blocks", 0) >= 40)
    assert 0 < disk.counters["written_blocks"] < 40 and disk.counters["no_space_blocks"] > 0
    result, same = engine.load(0, 40)  # the service keeps serving: every block is still in G2
    assert result.loaded == 40 and same
    engine.store(40, 8)
    assert engine.load(40, 8)[0].loaded == 8
    log = coordinator.log()
    assert "the G3 file is sparse" in log and "ENOSPC" in log


def test_filesystem_without_o_direct_falls_back_to_buffered_io(start, engines, instance, runtime_dir, disk_dir):
    coordinator = start(prefix=_private_mount_prefix("ramfs", "", disk_dir), disk_write_through=1)
    engine = engines(instance, runtime_dir, pool_blocks=8)
    engine.store(0, 8)
    engine.wait_disk(lambda d: d.counters.get("written_blocks", 0) == 8)
    engine.store(8, 8)  # evicts the first 8 from G2
    engine.wait_disk(lambda d: d.counters.get("written_blocks", 0) == 16)  # and unpins the new ones
    result, same = engine.load(0, 8)
    assert result.loaded == 8 and same
    assert engine.disk().counters["read_blocks"] == 8
    assert "the filesystem refuses O_DIRECT; using buffered I/O" in coordinator.log()


def test_missing_or_unwritable_disk_dir_fails_at_start(instance, runtime_dir, disk_dir):
    missing = CoordinatorProcess(instance, runtime_dir, "--disk-cache-gb", "1", "--disk-dir", str(disk_dir / "nope"))
    with pytest.raises(RuntimeError, match="does not exist"):
        missing.start()
    assert "create it, or point --disk-dir" in missing.log()
    read_only = CoordinatorProcess(instance, runtime_dir, "--disk-cache-gb", "1", "--disk-dir", str(disk_dir))
    read_only.args = _private_mount_prefix("tmpfs", "-o ro", disk_dir) + read_only.args
    with pytest.raises(RuntimeError, match="is not writable"):
        read_only.start()
