"""The disk tier (G3) in the coordinator: write-back with admission, staging of G3 hits into G2,
and keeping G2's `tier` flags true to what is on disk. Runs in the coordinator process, on its
loop thread; the bytes move in the NVMe I/O workers (`workers.disk_io`), reached through the
"disk" `WorkerGroup`.

Start (`DiskTier(config, workers=..., events=...)`: the "disk" `WorkerGroup` as a callable, and
the `tier.TierEvents` sink): opens the instance's G3 directory (`disk.store`: a missing or
unwritable --disk-dir fails here with `ConfigError`; files rebuilt from their slot headers and
fitted into the budget). It sees G2 pools through their face only (`pool`).

Hooks of `tier.Tier`, called by the coordinator:
- `attach(pool, namespace)`: a G2 pool exists (created or recovered). Opens or creates the
  namespace's file (`budget // tp_size`, or what is left) and makes the pool's `tier` flags agree
  with what is on disk.
- `on_allocated(pool, hashes)`: every client store: counts the uses for admission, plans write-back.
- `on_committed(pool, ids)`: every client commit; with `disk_write_through` the blocks are written now.
- `prepare_load(pool, hashes, g2_ids) -> Fetch | None`: a Lookup whose prefix ended before its
  last hash. None, at the cost of one dict lookup, unless the next block is on disk or being
  staged: then the prefix so far is pinned, G2 blocks are allocated for the G3 hits that continue
  it (`allocate_staging`), and read jobs are submitted. `Fetch` is a `tier.Staging`: its `future`
  is done when every read is; `result()` is the verified prefix (block ids, tiers); `release()`
  drops the fetch's own pins.
- `sweep(now)`: decays the admission filter and plans write-back; planning also runs after every
  finished job. Planning costs O(window) numpy work plus Python only for blocks not yet judged.
- `stats()` (`{"disks": [DiskStats, ...]}`), `close()`. G3 eviction itself (lowest priority class,
  then least recently used) is `G3Index.reserve`; a block it evicts that G2 still holds is
  marked dirty (tier 2) again.
Every finished job is reported to `events` as a transfer ("g2_to_g3", "g3_to_g2") of the bytes it
moved, and every block written or dropped as a KV event (tier 3).

Write-back: when a pool's free blocks (plus those being written) fall under `disk_low_watermark`
of its size (at most 1024 blocks), the blocks next in line for eviction that are not on disk and pass the admission filter are pinned and
written. On success the G2 block's `tier` becomes 3 (evicting it then loses nothing: G3 serves
it) and it goes back to the eviction end. A failed write leaves the block in G2, dirty; a slot the
disk had no room for (ENOSPC on a sparse file) is retired. With `disk_write_through`, every
committed block is written at once, whatever the filter says. A queued block is pinned until it
is taken for writing, so eviction cannot take it first, as long as fewer than
`WRITE_THROUGH_SHARE` of the pool's blocks are pinned so (G2 must keep room to serve); past that
it waits unpinned. A write lost with its worker is queued again. A queued block evicted or
invalidated before it was written is counted in the G3 file's `write_through_dropped` and logged
(rate-limited). So every block committed with write-through on either reaches G3 or is counted
(or failed a write: `write_errors`, `no_space_blocks`, `bad_g2_blocks`).

Staging: a read that verified registers its G2 block (tier 3, G2 checksum from the slot). One
that did not (EBADMSG, ENODATA, an I/O error) is freed, its slot dropped and counted, and the
lookup's prefix ends there: a block that does not verify is never served. A read lost with its
worker leaves the slot as it was. Two lookups that want the same block share one read.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import logging
import time
from typing import Callable

import numpy as np

from ..disk import format as g3
from .. import protocol as p
from ..config import ServiceConfig
from ..layout import Namespace
from ..shm import BlockState
from ..disk.admission import AdmissionFilter
from ..disk.index import G3Index, SlotState
from ..disk.store import G3Store
from .pool import BlockPool
from .supervisor import WorkerGroup
from .tier import Tier, TierEvents

log = logging.getLogger(__name__)

WORKER_KIND = "disk"
WRITE_PATH, READ_PATH = "g2_to_g3", "g3_to_g2"  # transfer paths (metrics)
WORKER_MODULE = "kvbm_shm.workers.disk_io"
JOB_BYTES = 32 << 20  # bytes per job: large enough to keep a worker's threads busy


def job_blocks(slot_bytes: int) -> int:
    """Blocks per I/O job: the contiguous run of slots one worker takes at a time."""
    return max(1, min(64, JOB_BYTES // slot_bytes))


MAX_WINDOW = 1024  # blocks ahead of eviction that write-back looks at, at most
WRITE_THROUGH_SHARE = 0.5  # of a pool's blocks, at most this many wait (pinned) for write-through
_DROP_LOG_EVERY_S = 10.0
_NOT_REJECTED = np.uint64(2**64 - 1)


@dataclasses.dataclass(eq=False)
class _Attached:
    """A G2 pool and its namespace's G3 file."""

    pool: BlockPool
    index: G3Index
    # per G2 block: the record generation at which admission last turned it down; while the record
    # is untouched (no hit, no touch, no reuse) and its hash is not stored again, the answer stands
    rejected_at: np.ndarray
    writing: int = 0  # blocks pinned by write jobs in flight: as good as clean for the window
    # (block, hash, pinned) committed and not yet taken for writing
    write_through: collections.deque = dataclasses.field(default_factory=collections.deque)
    queue_pins: int = 0  # queued blocks that hold a pin


@dataclasses.dataclass(eq=False)
class _Read:
    """The G3 slots one fetch stages into G2 blocks (Partial until verified), in one or more jobs."""

    pool: BlockPool
    index: G3Index
    blocks: list[int] = dataclasses.field(default_factory=list)
    slots: list[int] = dataclasses.field(default_factory=list)
    hashes: list[bytes] = dataclasses.field(default_factory=list)
    failed: dict[int, int] = dataclasses.field(default_factory=dict)  # position -> errno (0: job lost)
    jobs_left: int = 0
    ok: list[bool] | None = None  # set when every job finished
    started: float = 0.0  # time.perf_counter() when the jobs were submitted
    waiters: list["Fetch"] = dataclasses.field(default_factory=list)


class Fetch:
    """A lookup that waits for G3 reads (a `tier.Staging`). Created by `DiskTier.prepare_load`."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._steps: list[tuple[int, _Read | None, int]] = []  # (G2 block, None, 0) or (-1, read, position)
        self._pins: list[int] = []
        self._waiting: set[int] = set()  # id() of reads not finished yet

    def result(self) -> tuple[list[int], list[int]]:
        """The verified prefix: G2 block ids and, for each, the tier it came from."""
        ids, tiers = [], []
        for block, read, i in self._steps:
            if read is None:
                ids.append(block)
                tiers.append(p.Tier.CPU)
            elif read.ok[i]:
                ids.append(read.blocks[i])
                tiers.append(p.Tier.DISK)
            else:
                break
        return ids, tiers

    def release(self) -> None:
        if self._pins:
            self.pool.unpin(self._pins)
            self._pins = []

    def _pin(self, blocks: list[int]) -> None:
        if blocks:
            self.pool.pin(blocks, 0)
            self._pins.extend(blocks)

    def _wait(self, read: _Read, i: int) -> None:
        self._steps.append((-1, read, i))
        if id(read) not in self._waiting:
            self._waiting.add(id(read))
            read.waiters.append(self)

    def _finished(self, read: _Read) -> None:
        """`read` is done: pin what it staged for this fetch before anything can evict it."""
        self._pin([read.blocks[i] for _, r, i in self._steps if r is read and read.ok[i]])
        self._waiting.discard(id(read))
        if not self._waiting and not self.future.done():  # done: cancelled by a shutting-down server
            self.future.set_result(None)


class DiskTier(Tier):
    name = "g3"

    def __init__(self, config: ServiceConfig, *, workers: Callable[[], WorkerGroup | None], events: TierEvents):
        self.config = config
        self.store = G3Store(config)
        self._group = workers
        self._events = events
        self.admission = AdmissionFilter(config.disk_admit_uses)
        self._by_pool: dict[int, _Attached] = {}
        self._staging: dict[tuple[int, bytes], tuple[_Read, int]] = {}
        self._writes_in_flight = 0
        self._closed = False
        self._dropped_since_log = 0
        self._next_drop_log = 0.0

    # ------------------------------------------------------------ hooks

    def worker_args(self) -> tuple[str, ...]:
        return ("--lock", str(self.store.io_lock_path), "--threads", str(self.config.disk_io_threads))

    def attach(self, pool: BlockPool, namespace: Namespace) -> None:
        index = self.store.index_for(namespace, {a.index.fingerprint for a in self._by_pool.values()})
        if index is None:
            return
        self._by_pool[pool.pool_id] = _Attached(pool=pool, index=index,
                                                rejected_at=np.full(pool.num_blocks, _NOT_REJECTED))
        registered = pool.registered()
        on_disk = [b for h, b in registered if h in index.entries]
        pool.set_tier([b for _, b in registered], p.Tier.CPU)  # a recovered pool's flags may be stale
        pool.set_tier(on_disk, p.Tier.DISK)
        log.info("G3 for pool %d (%s): %s, %d slots, %d blocks on disk, %d of them also in G2", pool.pool_id,
                 namespace.model, index.path, index.num_slots, len(index.entries), len(on_disk))

    def on_allocated(self, pool: BlockPool, hashes: list[bytes]) -> None:
        """After an Allocate: count the uses, then plan write-back (free blocks went down)."""
        self.admission.offered(hashes)
        attached = self._by_pool.get(pool.pool_id)
        if attached is None:
            return
        for h in hashes:  # a cached hash stored again may pass admission now
            b = pool.block_of(h)
            if b is not None:
                attached.rejected_at[b] = _NOT_REJECTED
        self._plan_writes(attached)

    def on_committed(self, pool: BlockPool, ids: list[int]) -> None:
        attached = self._by_pool.get(pool.pool_id)
        if attached is None or not self.config.disk_write_through:
            return
        self._queue_write_through(attached, [b for b in ids if pool.state_of(b) == BlockState.REGISTERED])
        self._plan_writes(attached)

    def prepare_load(self, pool: BlockPool, hashes: list[bytes], g2_ids: list[int]) -> Fetch | None:
        attached = self._by_pool.get(pool.pool_id)
        if attached is None or self._group() is None:
            return None
        index = attached.index
        first = hashes[len(g2_ids)]
        if index.lookup(first) is None and (pool.pool_id, first) not in self._staging:
            return None
        prefix: list[tuple[str, bytes, object]] = []  # ("g2", h, block) | ("staging", h, (read, i)) | ("g3", h, slot)
        for h in hashes[len(g2_ids):]:
            b = pool.block_of(h)
            staged = self._staging.get((pool.pool_id, h)) if b is None else None
            slot = index.lookup(h) if b is None and staged is None else None
            if b is not None:
                prefix.append(("g2", h, b))
            elif staged is not None:  # another lookup is reading it: wait for that read
                prefix.append(("staging", h, staged))
            elif slot is not None:
                prefix.append(("g3", h, slot))
            else:
                break
        fetch = Fetch(pool)
        fetch._pin(g2_ids + [b for where, _, b in prefix if where == "g2"])  # first: allocating must not evict them
        fetch._steps.extend((b, None, 0) for b in g2_ids)
        staged = iter(pool.allocate_staging([h for where, h, _ in prefix if where == "g3"]))  # one batch
        read = _Read(pool=pool, index=index)
        for where, h, what in prefix:
            if where == "g2":
                fetch._steps.append((what, None, 0))
            elif where == "staging":
                fetch._wait(*what)
            else:
                got = next(staged)
                if got < 0:  # no room in G2, or a client is storing it right now: the prefix ends
                    pool.free([b for b in staged if b >= 0])
                    break
                index.begin_read(what)
                self._staging[(pool.pool_id, h)] = (read, len(read.blocks))
                fetch._wait(read, len(read.blocks))
                read.blocks.append(got)
                read.slots.append(what)
                read.hashes.append(h)
        if read.blocks:
            self._submit_reads(read)
        if not fetch._waiting:
            fetch.release()
            return None
        return fetch

    def pump(self) -> None:
        """Plan write-back for every pool with a G3 file."""
        for attached in self._by_pool.values():
            self._plan_writes(attached)

    def sweep(self, now: float) -> None:
        self.admission.decay(now)
        self.pump()

    def stats(self) -> dict:
        return {"disks": [
            p.DiskStats(fingerprint=fp, path=index.path, num_slots=index.num_slots, block_bytes=index.block_bytes,
                        stored=len(index.entries), writing=index.count(SlotState.WRITING),
                        reading=index.count(SlotState.READING), free=index.num_free, counters=dict(index.counters))
            for fp, index in self.store.indexes.items()]}

    def close(self) -> None:
        """Flush and close the files (the cache stays on disk for the next start)."""
        self._closed = True
        self.store.close()

    # ------------------------------------------------------------ write-back

    def _plan_writes(self, attached: _Attached) -> None:
        group = self._group()
        if self._closed or group is None:
            return
        pool, index = attached.pool, attached.index
        per_job = job_blocks(index.file.slot_bytes)
        room = 2 * per_job * max(group.alive(), 1) - self._writes_in_flight
        if room <= 0:
            return
        write_through = self.config.disk_write_through
        picked: list[int] = []
        if write_through:
            queue = attached.write_through
            unpin, lost = [], 0
            while queue and len(picked) < room:
                b, h, pinned = queue.popleft()
                if pinned:  # released below: the write pins what it takes, nothing runs in between
                    unpin.append(b)
                if pool.hash_of(b) == h and pool.state_of(b) == BlockState.REGISTERED:
                    if pool.tier_of(b) == p.Tier.CPU:
                        picked.append(b)
                else:  # evicted (unpinned), or invalidated
                    lost += 1
            attached.queue_pins -= len(unpin)
            if unpin:
                pool.unpin(unpin)
            self._write_through_dropped(attached, lost, "evicted or invalidated before it was written")
        else:
            window = min(max(1, int(self.config.disk_low_watermark * pool.num_blocks)), MAX_WINDOW)
            need = window - pool.num_free - attached.writing
            if need <= 0:
                return
            order = np.asarray(pool.eviction_order(need), np.int64)
            if not len(order):
                return
            gen = pool.generation_of(order)
            fresh = (pool.tier_of(order) == p.Tier.CPU) & (attached.rejected_at[order] != gen)
            on_disk = []
            for b, n, g in zip(order[fresh].tolist(), pool.hits_of(order[fresh]).tolist(), gen[fresh].tolist()):
                h = pool.hash_of(b)
                if index.lookup(h) is not None:  # stored again after an eviction, still on disk
                    on_disk.append(b)
                elif self.admission.admit(pool.pool_id, b, h, n):
                    picked.append(b)
                    if len(picked) >= room:
                        break
                else:
                    attached.rejected_at[b] = g
            pool.set_tier(on_disk, p.Tier.DISK)
        blocks, slots, hashes = [], [], []
        evicted: list[bytes] = []
        on_disk = []
        for i, b in enumerate(picked):
            h = pool.hash_of(b)
            if index.lookup(h) is not None:  # stored before and still on disk: nothing to write
                on_disk.append(b)
                continue
            got = index.reserve(h, int(pool.priority_of(b)), evicted)
            if got is None:  # every slot busy: write-through blocks wait for the next round
                if write_through:
                    self._queue_write_through(attached, picked[i:], front=True)
                break
            blocks.append(b)
            slots.append(got[0])
            hashes.append(h)
        pool.set_tier(on_disk, p.Tier.DISK)
        self._evicted_from_g3(pool, index, evicted)
        if not blocks:
            return
        pool.pin(blocks, 0)
        pinned_ns = time.monotonic_ns()
        started = time.perf_counter()
        self._writes_in_flight += len(blocks)
        attached.writing += len(blocks)
        for start in range(0, len(blocks), per_job):
            part = slice(start, start + per_job)
            job_ids, job_slots, job_hashes = blocks[part], slots[part], hashes[part]
            g2_checksums = pool.checksum_of(job_ids).tolist()
            job = p.DiskWrite(job_id=0, segment=pool.segment.name, segment_id=pool.segment.segment_id, path=index.path,
                              fingerprint=index.fingerprint, block_ids=job_ids, slots=job_slots, hashes=job_hashes,
                              generations=index.generation[job_slots].tolist(), g2_checksums=g2_checksums,
                              priorities=pool.priority_of(job_ids).tolist())
            fut = group.submit(job)
            fut.add_done_callback(lambda f, a=(attached, job_ids, job_slots, job_hashes, g2_checksums):
                                  self._write_done(*a, pinned_ns=None if write_through else pinned_ns,
                                                   started=started, fut=f))

    def _write_done(self, attached: _Attached, blocks: list[int], slots: list[int], hashes: list[bytes],
                    g2_checksums: list[int], pinned_ns: int | None, started: float,
                    fut: concurrent.futures.Future) -> None:
        pool, index = attached.pool, attached.index
        self._writes_in_flight -= len(blocks)
        attached.writing -= len(blocks)
        failed = _failures(fut, len(blocks), "write", index.path)
        xxh3 = fut.result().checksums if not fut.cancelled() and fut.exception() is None else []
        if len(xxh3) != len(blocks):  # a worker that does not say what it wrote wrote nothing usable
            failed = failed or dict.fromkeys(range(len(blocks)), errno.EIO)
        stored, bad_source, lost = [], [], []
        for i, (b, slot, h) in enumerate(zip(blocks, slots, hashes)):
            e = failed.get(i)
            if e is None:
                index.write_done(slot, ok=True, checksum=xxh3[i], g2_checksum=g2_checksums[i])
                stored.append(h)
                if pool.hash_of(b) == h and pool.state_of(b) == BlockState.REGISTERED:
                    pool.set_tier([b], p.Tier.DISK)
                continue
            index.write_done(slot, ok=False, retire=e in g3.NO_SPACE_ERRNOS)
            if e in g3.NO_SPACE_ERRNOS:
                index.counters["no_space_blocks"] += 1
            elif e == errno.EBADMSG:
                bad_source.append(b)
            elif e:
                index.counters["write_errors"] += 1
            else:
                lost.append((b, h))
        if pinned_ns is None and lost and not fut.cancelled():  # write-through: try again
            self._queue_write_through(attached, [b for b, _ in lost])
        index.counters["written_blocks"] += len(stored)
        if stored:
            self._events.transferred(WRITE_PATH, len(stored) * index.block_bytes, time.perf_counter() - started)
            self._events.event(p.BlockStored(pool_id=pool.pool_id, fingerprint=pool.fingerprint, hashes=stored,
                                             tier=p.Tier.DISK))
        if bad_source:  # its G2 bytes no longer match their checksum: nobody may load it
            index.counters["bad_g2_blocks"] += pool.invalidate(bad_source)
        if pinned_ns is None:
            pool.unpin(blocks)
        else:
            pool.unpin_cold(blocks, pinned_ns)
        if not fut.cancelled():
            self.pump()

    def _queue_write_through(self, attached: _Attached, ids: list[int], front: bool = False) -> None:
        """Queue Registered blocks for write-through, pinned while the pool's share allows."""
        pool = attached.pool
        room = max(0, int(WRITE_THROUGH_SHARE * pool.num_blocks) - attached.queue_pins)
        if ids[:room]:
            pool.pin(ids[:room], 0)
            attached.queue_pins += len(ids[:room])
        entries = [(b, pool.hash_of(b), i < room) for i, b in enumerate(ids)]
        if front:
            attached.write_through.extendleft(reversed(entries))
        else:
            attached.write_through.extend(entries)

    def _write_through_dropped(self, attached: _Attached, n: int, why: str) -> None:
        if not n:
            return
        attached.index.counters["write_through_dropped"] += n
        self._dropped_since_log += n
        now = time.monotonic()
        if now >= self._next_drop_log:
            log.warning("%d committed block(s) not written through to G3 (%s; counted in write_through_dropped)",
                        self._dropped_since_log, why)
            self._dropped_since_log = 0
            self._next_drop_log = now + _DROP_LOG_EVERY_S

    def _evicted_from_g3(self, pool: BlockPool, index: G3Index, hashes: list[bytes]) -> None:
        if not hashes:
            return
        still = [b for b in map(pool.block_of, hashes) if b is not None]
        pool.set_tier(still, p.Tier.CPU)
        self._events.event(p.BlockRemoved(pool_id=pool.pool_id, fingerprint=pool.fingerprint, hashes=hashes,
                                          tier=p.Tier.DISK))

    # ------------------------------------------------------------ staging

    def _submit_reads(self, read: _Read) -> None:
        group = self._group()
        pool, index = read.pool, read.index
        per_job = job_blocks(index.file.slot_bytes)
        read.jobs_left = -(-len(read.blocks) // per_job)
        read.started = time.perf_counter()
        for start in range(0, len(read.blocks), per_job):
            part = slice(start, start + per_job)
            slots = read.slots[part]
            job = p.DiskRead(job_id=0, segment=pool.segment.name, segment_id=pool.segment.segment_id, path=index.path,
                             fingerprint=index.fingerprint, block_ids=read.blocks[part], slots=slots,
                             hashes=read.hashes[part], generations=index.generation[slots].tolist(),
                             checksums=index.checksum[slots].tolist())
            group.submit(job).add_done_callback(lambda f, first=start, n=len(slots): self._read_job_done(read, first, n, f))

    def _read_job_done(self, read: _Read, first: int, n: int, fut: concurrent.futures.Future) -> None:
        for i, e in _failures(fut, n, "read", read.index.path).items():
            read.failed[first + i] = e
        read.jobs_left -= 1
        if read.jobs_left == 0:
            self._read_done(read)

    def _read_done(self, read: _Read) -> None:
        pool, index = read.pool, read.index
        read.ok = [i not in read.failed for i in range(len(read.blocks))]
        good = [i for i, ok in enumerate(read.ok) if ok]
        slots = [read.slots[i] for i in good]
        pool.register_staged([read.blocks[i] for i in good], index.g2_checksum[slots].tolist(),
                             index.priority[slots].tolist(), p.Tier.DISK)
        dropped = []
        for i, (b, slot, h) in enumerate(zip(read.blocks, read.slots, read.hashes)):
            del self._staging[(pool.pool_id, h)]
            e = read.failed.get(i)
            if e is None:
                index.read_done(slot, ok=True)
                continue
            pool.free([b])
            if not e:  # the job was lost with its worker: the slot is as good as before
                index.read_done(slot, ok=True)
                continue
            index.counters["corrupt_blocks" if e in (errno.EBADMSG, errno.ENODATA) else "read_errors"] += 1
            index.read_done(slot, ok=False)
            dropped.append(h)
        index.counters["read_blocks"] += len(good)
        if good:
            self._events.transferred(READ_PATH, len(good) * index.block_bytes, time.perf_counter() - read.started)
        if dropped:
            log.warning("%d G3 block(s) of %s failed on read: dropped, served as misses", len(dropped), index.path)
            self._events.event(p.BlockRemoved(pool_id=pool.pool_id, fingerprint=pool.fingerprint, hashes=dropped,
                                              tier=p.Tier.DISK))
        for fetch in read.waiters:
            fetch._finished(read)

def _failures(fut: concurrent.futures.Future, n: int, what: str, path: str) -> dict[int, int]:
    """Position -> errno of every block of a finished job that did not complete (0: the job was
    lost with its worker, or cancelled; the blocks themselves are not to blame)."""
    if fut.cancelled():  # shutting down
        return dict.fromkeys(range(n), 0)
    exc = fut.exception()
    if exc is not None:
        log.warning("G3 %s job on %s lost: %s", what, path, exc)
        return dict.fromkeys(range(n), 0)
    done: p.JobDone = fut.result()
    if done.ok:
        return {}
    log.error("G3 %s job on %s: %s", what, path, done.error or "failed")
    if not done.failed:  # the whole job failed before any block
        return dict.fromkeys(range(n), errno.EIO)
    codes = done.errnos if len(done.errnos) == len(done.failed) else [errno.EIO] * len(done.failed)
    return dict(zip(done.failed, codes))
