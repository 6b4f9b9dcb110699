"""Client library: talk to the coordinator and move KV between engine tensors and G2 blocks.

`Client` (blocking) and `AsyncClient` (asyncio) offer the same operations:

    client = Client(instance="default")                  # finds the coordinator's runtime dir
    pool = client.register_layout(namespace)             # attach the namespace's G2 pool
    kv = pool.bind(engine_tensors)                       # how this engine's tensors hold blocks
    client.store(kv, hashes, device_block_ids)           # allocate -> copy -> commit
    hits = client.lookup(pool, hashes)                   # longest cached prefix
    client.load(kv, hashes, device_block_ids)            # lookup -> copy -> verify (no pins)

Contract:
- Every call has a deadline (`timeout_s`) and goes through `replies` (the one reply matcher):
  replies are matched by request id, so a late reply of a timed-out call is discarded, never
  taken for another's. With no coordinator listening a call fails with `CoordinatorUnavailable`
  when none connects within the deadline; nothing is queued for a coordinator that is not there
  (so nothing stale reaches the next one). A call that got no reply in time fails with code
  TIMEOUT while the coordinator's process (named in the hello reply) is alive, i.e. it is slow,
  and with UNAVAILABLE once that process is gone.
- The lease is a token from the hello reply, sent with every request that acts on it. A
  background thread keeps it alive. When the coordinator does not know it (restarted, or the
  lease ended), the client says hello again, re-registers its pools (re-mapping a segment that
  was recreated) and retries the operation once; nothing is copied before that.
- Replies are not trusted: a reply of the wrong kind, a block id outside the attached pool, a
  list of the wrong length, a tier or sentinel where none may be, or a pool whose segment does
  not match what the reply and the namespace say, is a `ProtocolError` and nothing is copied.
  Pools are mapped with their header and block table read-only (only the coordinator writes
  them); block data read-write.
- `store` writes only blocks that are not cached yet, checksums each written block, and
  commits; if the copy fails, the blocks are freed, never registered.
- A lookup without pins costs no round trip when the pool's hash index (`hash_index`, in the
  segment) answers it (`HashIndex.answer`): its whole request was found, or no tier below G2
  could hold the rest (and the pool was not closed by a clean stop, and no record it read kept
  changing). Otherwise (and always with `pin`) it asks the coordinator. The index vouches for
  nothing: a block is a hit only if its record, read under the seqlock, is Registered under the
  asked hash. Lookups answered locally are reported in batches (`Touch` with `lookups` and each
  hit hash's `uses`, from the heartbeat thread every `USAGE_REPORT_S`, and before this client's
  next store), so the coordinator's counters, hit counts and eviction order still see them.
- `load` costs at most one round trip and holds no pins: it looks the prefix up, then copies it
  optimistically while summing the bytes (one pass). A block is loaded only if its record, read
  under the seqlock before the copy, is Registered under the requested hash, the record after the
  copy is the same incarnation (its `alloc_seq`, state, hash and checksum unchanged), and its bytes
  match the record's checksum. The loaded prefix ends at the first block that fails: it is
  reported in `LoadResult.failed`, and the device blocks from there on count as not loaded (the
  engine recomputes them), whatever bytes they now hold. A block evicted or reused during the copy
  is just a miss; one whose record held still but whose bytes do not match is also reported to
  the coordinator (which drops it if its bytes really are bad). Eviction never waits for readers.
- A pinned lookup or an allocation that times out is cancelled (`Cancel`, sent without waiting
  for its reply), so a slow coordinator does not leave pins or unfinished blocks behind.
- Copies go through `kernels.cpu_copy` (host memory on both sides).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import os
import threading
import time
from typing import Callable, Generator, Sequence

import numpy as np
import zmq
import zmq.asyncio

from . import protocol as p
from . import runtime
from .config import ClientConfig
from .errors import CoordinatorUnavailable, CorruptionError, ErrorCode, KvbmError, LeaseError, ProtocolError
from .kernels import cpu_copy
from .layout import ChunkTable, Namespace
from .replies import AsyncReplies, Peer, Replies
from .shm import BlockState, PoolSegment

log = logging.getLogger(__name__)

USAGE_REPORT_S = 0.05  # local lookups reach the coordinator's eviction order within this
_USAGE_MAX_HASHES = 1 << 14  # hits listed per report (the heartbeat thread counts them); more are only counted


@dataclasses.dataclass
class Pool:
    """A namespace's G2 pool as this client sees it (attached segment, ids valid this epoch)."""

    namespace: Namespace
    cache_bytes: int
    pool_id: int = -1
    segment: PoolSegment | None = None
    epoch: int = 0  # bumped when the pool was registered again after a coordinator restart
    usage: "_Usage" = dataclasses.field(default_factory=lambda: _Usage())  # local lookups not yet reported

    @property
    def num_blocks(self) -> int:
        return self.segment.num_blocks

    @property
    def block_bytes(self) -> int:
        return self.segment.block_bytes

    def bind(self, tensors: Sequence) -> "EngineKv":
        """Describe an engine's KV tensors in this pool's format (validated against the layout)."""
        return EngineKv(self, self.namespace.engine_layout.bind(tensors), list(tensors))

    def block(self, block_id: int) -> np.ndarray:
        """Zero-copy view of a G2 block's bytes (valid while the block is pinned or owned)."""
        return self.segment.block(block_id)

    def _attach(self, reply: p.PoolReply) -> None:
        """Map the reply's segment (unless it is the one mapped), after checking that it is the
        pool the reply describes, for this namespace. ProtocolError otherwise; nothing changes."""
        if self.segment is None or self.segment.segment_id != reply.segment_id:
            seg = PoolSegment.attach(reply.segment, table_writable=False)
            try:
                _check_pool(seg, reply, self.namespace)
            except BaseException:
                seg.close()
                raise
            old, self.segment = self.segment, seg
            if old is not None:
                old.close()
        else:
            _check_pool(self.segment, reply, self.namespace)
        self.pool_id = reply.pool_id


def _check_pool(seg: PoolSegment, reply: p.PoolReply, namespace: Namespace) -> None:
    if (seg.segment_id != reply.segment_id or int(seg.header["pool_id"]) != reply.pool_id
            or seg.num_blocks != reply.num_blocks or seg.block_bytes != reply.block_bytes
            or seg.block_bytes != namespace.kv.block_bytes or seg.fingerprint != namespace.fingerprint):
        raise ProtocolError(f"pool reply does not match segment {seg.name}: pool {reply.pool_id}, "
                            f"{reply.num_blocks} blocks of {reply.block_bytes} bytes, id {reply.segment_id!r}; the "
                            f"segment holds pool {int(seg.header['pool_id'])}, {seg.num_blocks} blocks of "
                            f"{seg.block_bytes} bytes, id {seg.segment_id!r}; the namespace needs "
                            f"{namespace.kv.block_bytes}-byte blocks")


def check_hits(num_blocks: int, num_hashes: int, block_ids: list[int], tiers: list[int] | None = None) -> None:
    """A hit prefix from a reply: at most one block per hash, each a block of the pool, and (when
    given) one tier per block, G2, G3 or G4. ProtocolError otherwise."""
    if len(block_ids) > num_hashes or not _in_pool(block_ids, num_blocks):
        raise ProtocolError(f"reply names {len(block_ids)} hit blocks for {num_hashes} hashes, ids "
                            f"{block_ids[:8]}; the pool has {num_blocks} blocks")
    if tiers is not None and (len(tiers) != len(block_ids)
                              or not set(tiers) <= {p.Tier.CPU, p.Tier.DISK, p.Tier.CLUSTER}):
        raise ProtocolError(f"reply names tiers {tiers[:8]} for {len(block_ids)} hit blocks")


def check_allocation(num_blocks: int, num_hashes: int, block_ids: list[int]) -> None:
    """Blocks to fill from a reply: one per hash, each a distinct block of the pool or a sentinel."""
    mine = [b for b in block_ids if b >= 0]
    if (len(block_ids) != num_hashes or not _in_pool(mine, num_blocks) or len(set(mine)) != len(mine)
            or not set(block_ids) - set(mine) <= _SENTINELS):
        raise ProtocolError(f"reply names blocks {block_ids[:8]} for {num_hashes} hashes; the pool has "
                            f"{num_blocks} blocks")


_SENTINELS = {p.ALREADY_STORED, p.IN_FLIGHT, p.NO_ROOM}


def _in_pool(block_ids: list[int], num_blocks: int) -> bool:
    return not block_ids or (min(block_ids) >= 0 and max(block_ids) < num_blocks)


@dataclasses.dataclass
class _Usage:
    """Lookups of one pool answered from its hash index since the last report."""

    hits: list[Sequence[bytes]] = dataclasses.field(default_factory=list)  # each lookup's hit prefix, in order
    listed: int = 0  # hashes in `hits`
    lookups: int = 0
    lookup_blocks: int = 0
    hit_blocks: int = 0


@dataclasses.dataclass
class EngineKv:
    """An engine's KV tensors bound to a pool. Keeps the tensors alive while bound."""

    pool: Pool
    chunks: ChunkTable
    tensors: list


@dataclasses.dataclass(frozen=True)
class StoreResult:
    stored: int  # blocks written and registered now
    present: int  # already cached: nothing written
    in_flight: int  # another client is writing them
    no_room: int  # the pool had nothing to evict


@dataclasses.dataclass(frozen=True)
class LoadResult:
    loaded: int  # the first `loaded` hashes are now in their device blocks
    tiers: list[int]  # where each loaded block was found
    failed: list[int]  # the position where the loaded prefix stopped short: failed verification, or evicted meanwhile


@dataclasses.dataclass
class _Notice:
    """A step item: send `request` and do not wait for its reply (a later call drops it as stale)."""

    request: p._Request


_Step = Generator[object, object, object]  # yields requests, notices or copy callables


class _Core:
    """What both clients share: connection state, lease recovery, and the operations as steps."""

    def __init__(self, config: ClientConfig | None, name: str, overrides: dict):
        self.config = config or ClientConfig.load(**overrides)
        self.name = name or f"pid{os.getpid()}"
        self.peer = Peer(self.config.endpoint or self._endpoint_from_runtime())  # pid and frame limit: from hello
        self.client_id = 0  # for display: the coordinator's number for this lease
        self.lease = b""  # the lease token, sent with every lease-scoped request
        self.lease_ms = 0
        self.instance_id = ""
        self.events_endpoint = ""
        self._pools: dict[str, Pool] = {}
        self._usage_lock = threading.Lock()
        self._heartbeat: _Heartbeat | None = None

    @property
    def endpoint(self) -> str:
        return self.peer.endpoint

    @property
    def coordinator_pid(self) -> int:
        return self.peer.coordinator_pid

    def _endpoint_from_runtime(self) -> str:
        """The endpoint of a coordinator we can trust: our own runtime directory and file, and the
        process they name listening (`runtime.trusted_info`); else ForeignError or, with no
        coordinator, CoordinatorUnavailable."""
        return runtime.trusted_info(self.config.instance_dir, self.config.timeout_s).endpoint

    def _new_socket(self, ctx: zmq.Context) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IMMEDIATE, 1)  # no coordinator: fail now, do not queue
        s.setsockopt(zmq.LINGER, 200)
        s.setsockopt(zmq.RECONNECT_IVL, 50)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        s.connect(self.endpoint)
        return s

    # ------------------------------------------------------------ steps

    def _hello_step(self) -> _Step:
        reply = yield p.Hello(req=0, name=self.name, pid=os.getpid())
        self.client_id, self.lease, self.lease_ms = reply.client_id, reply.lease, reply.lease_ms
        self.peer.coordinator_pid, self.peer.max_frame_bytes = reply.coordinator_pid, reply.max_frame_bytes
        self.instance_id, self.events_endpoint = reply.instance_id, reply.events_endpoint
        if self._heartbeat is not None:
            self._heartbeat.lease = self.lease
        for pool in self._pools.values():  # after a coordinator restart
            pool_reply = yield p.RegisterLayout(req=0, lease=self.lease, namespace=pool.namespace,
                                                cache_bytes=pool.cache_bytes)
            pool._attach(pool_reply)
            pool.epoch += 1
        return reply

    def _register_step(self, namespace: Namespace, cache_bytes: int) -> _Step:
        fp = namespace.fingerprint
        pool = self._pools.get(fp) or Pool(namespace, cache_bytes)
        reply = yield p.RegisterLayout(req=0, lease=self.lease, namespace=namespace, cache_bytes=cache_bytes)
        pool._attach(reply)
        self._pools[fp] = pool
        return pool

    def _lookup_step(self, pool: Pool, hashes: Sequence[bytes], pin: bool) -> _Step:
        """The checked LookupReply; a pinned lookup that times out or gets a bad reply is cancelled.
        Without pins, the pool's hash index answers when it can (see the module docstring)."""
        if not pin:
            ids = pool.segment.index.answer(hashes)
            if ids is not None:
                self._note_usage(pool, hashes, ids)
                return p.LookupReply(req=0, block_ids=ids, tiers=[p.Tier.CPU] * len(ids))
        lookup = p.Lookup(req=0, lease=self.lease, pool_id=pool.pool_id, hashes=list(hashes), pin=pin)
        try:
            reply = yield lookup
            check_hits(pool.num_blocks, len(lookup.hashes), reply.block_ids, reply.tiers)
        except (CoordinatorUnavailable, ProtocolError) as e:
            if pin and e.code != ErrorCode.UNAVAILABLE:  # the coordinator may have pinned: undo it
                yield _Notice(p.Cancel(req=0, lease=lookup.lease, target=lookup.req))
            raise
        return reply

    def _store_step(self, kv: EngineKv, hashes: Sequence[bytes], device_block_ids: Sequence[int]) -> _Step:
        if len(hashes) != len(device_block_ids):
            raise ValueError(f"{len(hashes)} hashes but {len(device_block_ids)} device blocks")
        pool = kv.pool
        report = self._usage_report(pool)
        if report is not None:  # sent first on this socket: the coordinator sees the use before the store
            yield _Notice(report)
        allocate = p.Allocate(req=0, lease=self.lease, pool_id=pool.pool_id, hashes=list(hashes))
        try:
            reply = yield allocate
            check_allocation(pool.num_blocks, len(allocate.hashes), reply.block_ids)
        except (CoordinatorUnavailable, ProtocolError) as e:
            if e.code != ErrorCode.UNAVAILABLE:  # the coordinator may have allocated: free it
                yield _Notice(p.Cancel(req=0, lease=allocate.lease, target=allocate.req))
            raise
        ids = reply.block_ids
        todo = [i for i, b in enumerate(ids) if b >= 0]
        counts = {s: ids.count(s) for s in (p.ALREADY_STORED, p.IN_FLIGHT, p.NO_ROOM)}
        if not todo:
            return StoreResult(0, counts[p.ALREADY_STORED], counts[p.IN_FLIGHT], counts[p.NO_ROOM])
        g2 = [ids[i] for i in todo]
        dev = [device_block_ids[i] for i in todo]
        try:
            checksums = yield (lambda: _gather(kv, dev, g2, self.config.copy_threads))
        except BaseException:
            yield p.Free(req=0, lease=allocate.lease, pool_id=pool.pool_id, block_ids=g2)
            raise
        yield p.Commit(req=0, lease=allocate.lease, pool_id=pool.pool_id, block_ids=g2, checksums=checksums)
        return StoreResult(len(g2), counts[p.ALREADY_STORED], counts[p.IN_FLIGHT], counts[p.NO_ROOM])

    def _load_step(self, kv: EngineKv, hashes: Sequence[bytes], device_block_ids: Sequence[int]) -> _Step:
        """At most one round trip: an unpinned lookup, then an optimistic copy (see `_scatter`). Eviction
        never waits for a reader; a block evicted or rewritten under the copy is a miss."""
        if len(hashes) != len(device_block_ids):
            raise ValueError(f"{len(hashes)} hashes but {len(device_block_ids)} device blocks")
        pool = kv.pool
        lease = self.lease
        reply = yield from self._lookup_step(pool, hashes, pin=False)
        ids, tiers = reply.block_ids, reply.tiers
        if not ids:
            return LoadResult(0, [], [])
        good, bad_bytes = yield (lambda: _scatter(kv, device_block_ids[:len(ids)], ids, hashes[:len(ids)],
                                                  self.config.verify_checksums, self.config.copy_threads))
        if good == len(ids):
            return LoadResult(good, tiers, [])
        if bad_bytes:  # the record held still and the bytes did not match it: tell the coordinator
            yield p.Invalidate(req=0, lease=lease, pool_id=pool.pool_id, block_ids=[ids[good]],
                               reason="failed verification on load")
            log.warning("block %d of pool %d failed verification: reported, loaded %d of %d",
                        ids[good], pool.pool_id, good, len(ids))
        return LoadResult(good, tiers[:good], [good])

    def _hits_step(self, pool: Pool, hashes: Sequence[bytes], pin: bool) -> _Step:
        reply = yield from self._lookup_step(pool, hashes, pin)
        return reply.block_ids

    def _note_usage(self, pool: Pool, hashes: Sequence[bytes], ids: list[int]) -> None:
        with self._usage_lock:
            usage = pool.usage
            usage.lookups += 1
            usage.lookup_blocks += len(hashes)
            usage.hit_blocks += len(ids)
            if ids and usage.listed < _USAGE_MAX_HASHES:  # counted by the report, off the lookup's path
                usage.hits.append(hashes[:len(ids)])
                usage.listed += len(ids)

    def _usage_report(self, pool: Pool) -> p.Touch | None:
        """The Touch that reports `pool`'s local lookups since the last report, or None."""
        with self._usage_lock:
            usage = pool.usage
            if not usage.lookups:
                return None
            pool.usage = _Usage()
        uses = collections.Counter(itertools.chain.from_iterable(usage.hits))  # in order of first use
        return p.Touch(req=0, lease=self.lease, pool_id=pool.pool_id, hashes=list(uses), uses=list(uses.values()),
                       lookups=usage.lookups, lookup_blocks=usage.lookup_blocks, hit_blocks=usage.hit_blocks)

    def _simple_step(self, request: p._Request) -> _Step:
        reply = yield request
        return reply

    def _deadline_s(self, request: p._Request) -> float:
        """Registering a layout may create and pre-fault a pool (about a second per GiB)."""
        return self.config.setup_timeout_s if isinstance(request, p.RegisterLayout) else self.config.timeout_s


def _gather(kv: EngineKv, device_ids: list[int], g2_ids: list[int], threads: int) -> list[int]:
    """Copy device blocks into G2 blocks; their checksums."""
    return cpu_copy.gather(kv.chunks, device_ids, kv.pool.segment.block_addresses(g2_ids), threads).tolist()


def _scatter(kv: EngineKv, device_ids: Sequence[int], g2_ids: list[int], hashes: Sequence[bytes], verify: bool,
             threads: int) -> tuple[int, bool]:
    """Copy G2 blocks into device blocks, optimistically (no pins); returns the length of the prefix
    that is vouched for, and whether the block after it failed on its bytes (rather than on its
    record changing: evicted, or reused, during the copy).

    Block i counts only if its record, read under the seqlock before the copy, is Registered under
    `hashes[i]`; the record read again after the copy is the same incarnation (`alloc_seq`, state,
    hash, checksum unchanged: a writer gets a block only after the coordinator has changed its
    record, so no write can overlap the copy unseen); and (with `verify`) the bytes copied match
    that checksum. Blocks after the first whose record does not name its hash are not copied."""
    seg = kv.pool.segment
    try:
        before = seg.read_records(g2_ids)
    except CorruptionError:
        return 0, False
    named = (before["state"] == BlockState.REGISTERED) & (before["hash"] == np.frombuffer(b"".join(hashes), "V16"))
    n = _prefix(named)
    if not n:
        return 0, False
    ids = g2_ids[:n]
    sums = cpu_copy.scatter(kv.chunks, list(device_ids[:n]), seg.block_addresses(ids), threads)
    try:
        after = seg.read_records(ids)
    except CorruptionError:
        return 0, False
    before = before[:n]
    same = _prefix(np.logical_and.reduce([after[f] == before[f] for f in ("alloc_seq", "state", "hash", "checksum")]))
    if not verify:
        return same, False
    good = _prefix(sums[:same] == before["checksum"][:same])
    return good, good < same


def _prefix(ok: np.ndarray) -> int:
    """Length of the leading run of True in `ok`."""
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if len(bad) else len(ok)


class Client(_Core):
    """Blocking client. Thread-safe: calls are serialised on one socket."""

    def __init__(self, config: ClientConfig | None = None, *, name: str = "", **overrides):
        super().__init__(config, name, overrides)
        self._ctx = zmq.Context()
        self._sock = self._new_socket(self._ctx)
        self._replies = Replies(self._sock, self.peer)
        self._lock = threading.RLock()
        try:
            self._drive(self._hello_step, retry=False)
        except BaseException:
            self._sock.close(0)
            self._ctx.term()
            raise
        self._heartbeat = _Heartbeat(self)

    def register_layout(self, namespace: Namespace, cache_bytes: int = 0) -> Pool:
        return self._drive(lambda: self._register_step(namespace, cache_bytes))

    def lookup(self, pool: Pool, hashes: Sequence[bytes], pin: bool = False) -> list[int]:
        """G2 block ids of the longest cached prefix of `hashes` (pinned if `pin`)."""
        return self._drive(lambda: self._hits_step(pool, hashes, pin))

    def store(self, kv: EngineKv, hashes: Sequence[bytes], device_block_ids: Sequence[int]) -> StoreResult:
        return self._drive(lambda: self._store_step(kv, hashes, device_block_ids))

    def load(self, kv: EngineKv, hashes: Sequence[bytes], device_block_ids: Sequence[int]) -> LoadResult:
        return self._drive(lambda: self._load_step(kv, hashes, device_block_ids))

    def release(self, pool: Pool, block_ids: Sequence[int]) -> None:
        self._drive(lambda: self._simple_step(
            p.Release(req=0, lease=self.lease, pool_id=pool.pool_id, block_ids=list(block_ids))))

    def touch(self, pool: Pool, hashes: Sequence[bytes], priority: int | None = None) -> int:
        reply = self._drive(lambda: self._simple_step(
            p.Touch(req=0, lease=self.lease, pool_id=pool.pool_id, hashes=list(hashes), priority=priority)))
        return reply.count

    def stats(self) -> p.StatsReply:
        return self._drive(lambda: self._simple_step(p.Stats(req=0)))

    def clear(self, pool: Pool | None = None, model: str = "") -> int:
        """Drop every cached (G2) block of `pool`, or of every pool of the instance whose model
        contains `model` (all pools by default); returns how many blocks were dropped."""
        reply = self._drive(lambda: self._simple_step(p.Clear(
            req=0, lease=self.lease, pool_id=-1 if pool is None else pool.pool_id, model=model)))
        return reply.count

    def request(self, request: p._Request) -> p.Reply:
        """Send one raw protocol request (its `req` is replaced); returns the reply or raises.
        Not retried after a lost lease (the request names the old lease token), and not
        cancelled when it times out."""
        return self._drive(lambda: self._simple_step(request), retry=False)

    def close(self) -> None:
        """Close the lease (pins dropped, unfinished blocks freed) and the sockets."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
        with self._lock:
            try:
                self._call(p.Goodbye(req=0, lease=self.lease), timeout_s=min(self.config.timeout_s, 1.0))
            except KvbmError:
                pass
            for pool in self._pools.values():
                if pool.segment is not None:
                    pool.segment.close()
            self._sock.close(0)
            self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ transport

    def _drive(self, make_steps: Callable[[], _Step], retry: bool = True):
        """Run an operation; the socket is locked per call, not across copies, so one thread's
        load does not wait for another thread's store to finish copying."""
        lease = self.lease
        try:
            return self._run(make_steps())
        except LeaseError:
            if not retry:
                raise
            with self._lock:
                if self.lease == lease:  # no other thread has recovered the lease yet
                    log.info("lease lost (coordinator restarted?): saying hello again")
                    self._run(self._hello_step())
            return self._run(make_steps())

    def _run(self, steps: _Step):
        value, error = None, None
        while True:
            try:
                item = steps.throw(error) if error is not None else steps.send(value)
            except StopIteration as done:
                return done.value
            value, error = None, None
            try:
                if isinstance(item, _Notice):
                    self._notify(item.request)
                else:
                    value = item() if callable(item) else self._call(item)
            except BaseException as e:
                error = e

    def _notify(self, request: p._Request) -> None:
        with self._lock:
            if not self._replies.notify(request):
                log.warning("%s not sent: no coordinator is connected", type(request).__name__)

    def _call(self, request: p._Request, timeout_s: float | None = None) -> p.Reply:
        with self._lock:
            return self._replies.call(request, timeout_s or self._deadline_s(request))


class AsyncClient(_Core):
    """asyncio client: the same operations as `Client`, as coroutines. Copies run in a thread."""

    def __init__(self, config: ClientConfig | None = None, *, name: str = "", **overrides):
        super().__init__(config, name, overrides)
        self._ctx = zmq.asyncio.Context()
        self._sock = self._new_socket(self._ctx)
        self._replies = AsyncReplies(self._sock, self.peer)
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, config: ClientConfig | None = None, *, name: str = "", **overrides) -> "AsyncClient":
        client = cls(config, name=name, **overrides)
        try:
            await client._drive(client._hello_step, retry=False)
        except BaseException:
            client._sock.close(0)
            client._ctx.term()
            raise
        client._heartbeat = _Heartbeat(client)
        return client

    async def register_layout(self, namespace: Namespace, cache_bytes: int = 0) -> Pool:
        return await self._drive(lambda: self._register_step(namespace, cache_bytes))

    async def lookup(self, pool: Pool, hashes: Sequence[bytes], pin: bool = False) -> list[int]:
        return await self._drive(lambda: self._hits_step(pool, hashes, pin))

    async def store(self, kv: EngineKv, hashes: Sequence[bytes], device_block_ids: Sequence[int]) -> StoreResult:
        return await self._drive(lambda: self._store_step(kv, hashes, device_block_ids))

    async def load(self, kv: EngineKv, hashes: Sequence[bytes], device_block_ids: Sequence[int]) -> LoadResult:
        return await self._drive(lambda: self._load_step(kv, hashes, device_block_ids))

    async def release(self, pool: Pool, block_ids: Sequence[int]) -> None:
        await self._drive(lambda: self._simple_step(
            p.Release(req=0, lease=self.lease, pool_id=pool.pool_id, block_ids=list(block_ids))))

    async def touch(self, pool: Pool, hashes: Sequence[bytes], priority: int | None = None) -> int:
        reply = await self._drive(lambda: self._simple_step(
            p.Touch(req=0, lease=self.lease, pool_id=pool.pool_id, hashes=list(hashes), priority=priority)))
        return reply.count

    async def stats(self) -> p.StatsReply:
        return await self._drive(lambda: self._simple_step(p.Stats(req=0)))

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        async with self._lock:
            try:
                await self._call(p.Goodbye(req=0, lease=self.lease), timeout_s=min(self.config.timeout_s, 1.0))
            except KvbmError:
                pass
            for pool in self._pools.values():
                if pool.segment is not None:
                    pool.segment.close()
            self._sock.close(0)
            self._ctx.term()

    async def _drive(self, make_steps: Callable[[], _Step], retry: bool = True):
        async with self._lock:
            try:
                return await self._run(make_steps())
            except LeaseError:
                if not retry:
                    raise
                await self._run(self._hello_step())
                return await self._run(make_steps())

    async def _run(self, steps: _Step):
        value, error = None, None
        while True:
            try:
                item = steps.throw(error) if error is not None else steps.send(value)
            except StopIteration as done:
                return done.value
            value, error = None, None
            try:
                if isinstance(item, _Notice):
                    await self._notify(item.request)
                else:
                    value = await asyncio.to_thread(item) if callable(item) else await self._call(item)
            except BaseException as e:
                error = e

    async def _notify(self, request: p._Request) -> None:
        if not await self._replies.notify(request):
            log.warning("%s not sent: no coordinator is connected", type(request).__name__)

    async def _call(self, request: p._Request, timeout_s: float | None = None) -> p.Reply:
        return await self._replies.call(request, timeout_s or self._deadline_s(request))


class _Heartbeat(threading.Thread):
    """Keeps a client's lease alive from its own socket, every third of the lease, and reports
    the pools' local lookups every `USAGE_REPORT_S`."""

    def __init__(self, core: _Core):
        super().__init__(name="kvbm-heartbeat", daemon=True)
        self.lease = core.lease
        self._interval_s = max(core.lease_ms / 3000, 0.01)
        self._core = core
        self._stop_event = threading.Event()
        self.start()

    def run(self) -> None:
        ctx = zmq.Context()
        sock = self._core._new_socket(ctx)
        replies = Replies(sock, self._core.peer)
        next_beat = time.monotonic() + self._interval_s
        try:
            while not self._stop_event.wait(min(self._interval_s, USAGE_REPORT_S)):
                replies.drain()  # the replies to earlier notices
                todo: list[p._Request] = [r for r in map(self._core._usage_report, list(self._core._pools.values()))
                                          if r is not None]
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self._interval_s
                    todo.append(p.Heartbeat(req=0, lease=self.lease))
                for request in todo:
                    if not replies.notify(request):  # coordinator down: the next operation finds out
                        break
        finally:
            sock.close(0)
            ctx.term()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=2)
