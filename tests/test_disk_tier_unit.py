"""The coordinator's disk tier against exact state, in one process: a real G2 pool, a real G3
file, and a hand-written worker group whose jobs the test runs (through the real I/O worker
handler) or loses, one at a time. Concurrency that a multiprocess test can only hope to hit is
stepped through here: two lookups wanting the same block from disk, a read lost with its worker,
G3 evicting a block that G2 still holds, a disk that fills up (simulated with a file size limit,
so it runs without root; tests/test_disk_tier.py uses a real tiny tmpfs where it may mount one)."""

import collections
import concurrent.futures
import resource
import uuid

import numpy as np
import pytest

from kvbm_shm.disk import format as g3
from kvbm_shm import protocol as p
from kvbm_shm.config import ServiceConfig
from kvbm_shm.control.disk_tier import DiskTier
from kvbm_shm.disk.index import SlotState
from kvbm_shm.control.pool import BlockPool
from kvbm_shm.control.tier import TierEvents
from kvbm_shm.errors import ErrorCode, KvbmError
from kvbm_shm.kernels import cpu_copy
from kvbm_shm.layout import EngineLayout, KvLayout, Namespace, TensorSpec
from kvbm_shm.shm import BlockState, PoolSegment, unlink
from kvbm_shm.workers.disk_io import DiskIo

NS = Namespace("unit", KvLayout(1, 2, 16, 64, "float32"), EngineLayout((TensorSpec((2, 16, 64), 1, "float32"),)))
BLOCK = NS.kv.block_bytes  # 8 KiB


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


class FakeWorkers:
    """A WorkerGroup stand-in: jobs wait until the test runs or loses them."""

    def __init__(self):
        self.jobs: list[tuple[p._Job, concurrent.futures.Future]] = []
        self.io = DiskIo(threads=2)

    def submit(self, job):
        fut = concurrent.futures.Future()
        self.jobs.append((job, fut))
        return fut

    def alive(self) -> int:
        return 1

    def run_all(self) -> int:
        n = 0
        while self.jobs:
            job, fut = self.jobs.pop(0)
            fut.set_result(self.io.handle(job))
            n += 1
        return n

    def lose_all(self) -> None:
        while self.jobs:
            _, fut = self.jobs.pop(0)
            fut.set_exception(KvbmError("disk worker disk-0 died during the job", ErrorCode.WORKER_FAILED))


@pytest.fixture
def tier(tmp_path):
    made = []

    def make(pool_blocks=8, disk_slots=16, **settings):
        config = ServiceConfig(instance=f"u{uuid.uuid4().hex[:8]}", disk_dir=tmp_path,
                               disk_cache_gb=(4096 + disk_slots * (4096 + BLOCK)) / 2**30, **settings)
        name = f"kvbm-{config.instance}-pool-0"
        seg = PoolSegment.create(name, pool_id=0, num_blocks=pool_blocks, block_bytes=BLOCK, instance=config.instance,
                                 segment_id=uuid.uuid4().hex, fingerprint=NS.fingerprint, namespace=b"")
        events = []
        pool = BlockPool(0, seg, NS.model, events.append)
        workers = FakeWorkers()
        disk = DiskTier(config, workers=lambda: workers, events=TierEvents(events.append, collections.Counter()))
        disk.attach(pool, NS)
        made.append((disk, seg))
        return disk, pool, workers, events

    yield make
    for disk, seg in made:
        disk.close()
        name = seg.name
        seg.close()
        unlink(name)


def store(pool: BlockPool, disk: DiskTier, hashes: list[bytes], seed: int = 0) -> list[int]:
    """What a client does: allocate, fill, commit with the G2 checksum."""
    ids = pool.allocate(hashes, 1)
    disk.on_allocated(pool, hashes)
    rng = np.random.default_rng(seed)
    for b in ids:
        pool.segment.block(b)[:] = rng.integers(0, 256, BLOCK, np.uint8)
    pool.commit(ids, [cpu_copy.checksum(pool.segment.block(b)) for b in ids], 0)
    disk.on_committed(pool, ids)
    return ids


def test_two_lookups_share_one_read(tier):
    disk, pool, workers, _ = tier(disk_write_through=True)
    ids = store(pool, disk, [h(0), h(1)])
    want = [pool.segment.block(b).copy() for b in ids]
    assert workers.run_all() == 1 and disk.stats()["disks"][0].stored == 2
    pool.invalidate(ids)  # gone from G2 (as if evicted): only G3 has them now
    first = disk.prepare_load(pool, [h(0), h(1)], [])
    second = disk.prepare_load(pool, [h(0), h(1)], [])
    assert len(workers.jobs) == 1  # the second lookup waits for the first one's read
    assert not first.future.done() and not second.future.done()
    workers.run_all()
    assert first.future.done() and second.future.done()
    a, b = first.result(), second.result()
    assert a == b and a[1] == [p.Tier.DISK] * 2
    staged = a[0]
    assert [int(pool.segment.table["refcount"][x]) for x in staged] == [2, 2]  # one pin per waiting lookup
    assert all(np.array_equal(pool.segment.block(x), w) for x, w in zip(staged, want))
    assert [int(pool.segment.table["tier"][x]) for x in staged] == [p.Tier.DISK] * 2
    first.release()
    second.release()
    assert pool.stats()["pinned"] == 0 and pool.lookup([h(0), h(1)]) == staged


def test_a_read_lost_with_its_worker_keeps_the_block_on_disk(tier):
    disk, pool, workers, _ = tier(disk_write_through=True)
    ids = store(pool, disk, [h(0)])
    workers.run_all()
    pool.invalidate(ids)
    fetch = disk.prepare_load(pool, [h(0)], [])
    workers.lose_all()
    assert fetch.result() == ([], [])  # nothing served...
    fetch.release()
    assert pool.stats() == {"free": 8, "partial": 0, "registered": 0, "pinned": 0, "inactive": 0}
    d = disk.stats()["disks"][0]
    assert d.stored == 1 and d.reading == 0 and "corrupt_blocks" not in d.counters  # ...and nothing dropped
    again = disk.prepare_load(pool, [h(0)], [])
    workers.run_all()
    assert again.result()[1] == [p.Tier.DISK]
    again.release()


def test_g3_eviction_marks_the_g2_copy_dirty_again(tier):
    disk, pool, workers, events = tier(disk_slots=2, disk_write_through=True)
    ids = store(pool, disk, [h(0), h(1)])
    workers.run_all()
    assert [int(pool.segment.table["tier"][b]) for b in ids] == [p.Tier.DISK] * 2
    store(pool, disk, [h(2)], seed=1)  # G3 holds 2: h0, the least recently used, makes room
    workers.run_all()
    assert int(pool.segment.table["tier"][ids[0]]) == p.Tier.CPU  # evicting it from G2 would lose it now
    assert int(pool.segment.table["tier"][ids[1]]) == p.Tier.DISK
    removed = [e for e in events if isinstance(e, p.BlockRemoved) and e.tier == p.Tier.DISK]
    assert [e.hashes for e in removed] == [[h(0)]]


def test_write_back_writes_what_eviction_takes_next_and_only_what_passes_admission(tier):
    disk, pool, workers, _ = tier(pool_blocks=8, disk_low_watermark=0.25)
    store(pool, disk, [h(i) for i in range(6)])  # 2 blocks left free: nothing to do yet
    assert not workers.jobs
    pool.lookup([h(0), h(1), h(3)])  # reused: h0, h1 and h3 pass admission; h2 and h4, h5 do not
    store(pool, disk, [h(6)], seed=1)  # 1 free: the next block in line is h2 (never reused)
    assert not workers.jobs
    store(pool, disk, [h(7)], seed=2)  # 0 free: the window is h2, h4 -> nothing worth writing
    assert not workers.jobs
    assert pool.allocate([h(4)], 1) == [p.ALREADY_STORED]  # an engine stores h4 again: its second use
    disk.on_allocated(pool, [h(4)])
    (job, _), = workers.jobs
    assert job.hashes == [h(4)] and pool.segment.table["refcount"][pool.block_of(h(4))] == 1  # pinned while written
    workers.run_all()
    b4 = pool.block_of(h(4))
    assert int(pool.segment.table["tier"][b4]) == p.Tier.DISK and pool.segment.table["refcount"][b4] == 0
    assert pool.eviction_order(1) == [b4]  # written back, it goes first: evicting it costs nothing


def test_a_block_whose_g2_bytes_rotted_is_not_written_and_is_invalidated(tier):
    disk, pool, workers, _ = tier(disk_write_through=True)
    (b,) = pool.allocate([h(0)], 1)
    pool.segment.block(b)[:] = 7
    pool.commit([b], [cpu_copy.checksum(pool.segment.block(b))], 0)
    pool.segment.block(b)[100] ^= 1  # a bit flips in G2 after the commit
    disk.on_committed(pool, [b])
    workers.run_all()
    d = disk.stats()["disks"][0]
    assert d.stored == 0 and d.counters["bad_g2_blocks"] == 1
    assert pool.state_of(b) == BlockState.RESET and pool.lookup([h(0)]) == []


def test_a_full_disk_retires_slots_and_keeps_the_blocks_in_g2(tier):
    """Disk full without a tiny filesystem: a file size limit (RLIMIT_FSIZE) makes the kernel
    refuse writes past slot 1 (EFBIG, handled as ENOSPC is), in this very process."""
    disk, pool, workers, _ = tier(pool_blocks=8, disk_slots=8, disk_write_through=True)
    ids = store(pool, disk, [h(i) for i in range(4)])
    index = disk.store.indexes[NS.fingerprint]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (g3.slot_offset(2, index.file.slot_bytes), hard))
    try:
        workers.run_all()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    d = disk.stats()["disks"][0]
    assert (d.counters["written_blocks"], d.counters["no_space_blocks"], d.stored) == (2, 2, 2)
    assert [SlotState(int(s)) for s in index.state[:4]] == [SlotState.STORED] * 2 + [SlotState.RETIRED] * 2
    assert [int(pool.segment.table["tier"][b]) for b in ids] == [p.Tier.DISK] * 2 + [p.Tier.CPU] * 2  # still dirty
    assert pool.lookup([h(i) for i in range(4)]) == ids  # and still served from G2
    store(pool, disk, [h(9)], seed=3)  # the next write takes a slot the disk has room for
    workers.run_all()
    assert disk.stats()["disks"][0].stored == 3
