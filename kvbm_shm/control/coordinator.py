"""Request handlers of the coordinator: pools, budget and leases. No sockets, no blocking.

`Coordinator.handle(request)` returns a reply, or a `Deferred` when the work must run off the
server loop (creating a pool pre-faults gigabytes of shm); the server calls
`Coordinator.complete(deferred)` once its future is done. A caller's mistake (unknown lease,
pool or block, a block it does not own or has not pinned, malformed values) becomes an
`ErrorReply` with its code, and nothing is changed by a refused batch: every batch is checked
whole before any of it is applied.

Every lease-scoped request names its lease by token (`leases`); a request acts only on what its
own lease holds. `Cancel` undoes what a request the client gave up on left held (pins of a pinned
Lookup, blocks of an Allocate). `Invalidate` drops a block only after checksumming its bytes
again here: a client cannot make good blocks disappear. Bounds: `max_leases`,
`max_leases_per_process` and `max_pools` (CAPACITY past them), and a namespace description of at
most `shm.MAX_NAMESPACE_BYTES`.

`sweep()` ends leases that expired or whose process died, dropping their pins and freeing their
unfinished blocks. `take_events()` hands over the KV events produced since the last call.
`recover()` adopts the pools a dead coordinator of the same instance left in /dev/shm.

Tiers (`tier`): the coordinator keeps a list of `Tier`s and calls each hook on every one of them;
it never asks which tiers exist. G1 (`devices.DeviceTier`) is always there (its requests need
transfer workers); `open_disk_tier()` adds G3 (`disk_tier.DiskTier`), `open_cluster_tier()` G4
(`cluster_tier.ClusterTier`, with --cluster), `add_tier` any other. A
Lookup whose G2 prefix ends early asks the tiers in order to stage the rest (`prepare_load`):
then it is a `Deferred` answered once the blocks are in G2 and verified; when a staging's prefix
still ends early, the tiers after it are asked for the rest.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import time
import uuid
from collections import Counter

import msgspec

from .. import protocol as p
from ..cluster.endpoint import PeerEndpoint
from ..config import ServiceConfig
from ..errors import CapacityError, ErrorCode, ForeignError, KvbmError, RequestError
from ..kernels import cpu_copy
from ..layout import Namespace
from ..names import pool_name, pool_prefix
from ..shm import (MAX_NAMESPACE_BYTES, BlockState, PoolSegment, free_pool_id, list_segments,
                   unlink)
from . import devices, disk_tier
from .cluster_tier import ClusterTier
from .devices import DeviceTier
from .disk_tier import DiskTier
from .leases import Held, Lease, LeaseTable
from .pool import BlockPool
from .supervisor import WorkerGroup
from .tier import Deferred, Staging, Tier, TierEvents

log = logging.getLogger(__name__)


class Coordinator:
    def __init__(self, config: ServiceConfig, events_endpoint: str = "",
                 workers: dict[str, WorkerGroup] | None = None):
        self.config = config
        self.workers = {} if workers is None else workers  # filled by the server before the loop runs
        self.instance_id = uuid.uuid4().hex
        self.events_endpoint = events_endpoint
        self.started = time.monotonic()
        self.leases = LeaseTable(config.lease_ms, config.max_leases, config.max_leases_per_process)
        self.pools: dict[int, BlockPool] = {}
        self._pool_bytes: dict[int, int] = {}
        self._by_fingerprint: dict[str, int] = {}
        self._namespaces: dict[int, Namespace] = {}
        self._creating: dict[str, concurrent.futures.Future] = {}
        self._reserved_bytes = 0
        self._events: list[p.Event] = []
        self.counters: Counter = Counter()
        self.events = TierEvents(self._emit, self.counters)  # what tiers report; metrics listens
        self.tiers: list[Tier] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvbm-pool-create")
        self._handlers = {
            p.Hello: self._hello, p.RegisterLayout: self._register_layout, p.Lookup: self._lookup,
            p.Allocate: self._allocate, p.Commit: self._commit, p.Release: self._release,
            p.Free: self._free, p.Touch: self._touch, p.Invalidate: self._invalidate, p.Cancel: self._cancel,
            p.Heartbeat: self._heartbeat, p.Goodbye: self._goodbye, p.Stats: self._stats,
            p.Clear: self._clear,
        }
        self.add_tier(DeviceTier(instance=config.instance, leases=self.leases, pool_of=self._pool, store=self,
                                 workers=functools.partial(self.workers.get, devices.WORKER_KIND),
                                 events=self.events))

    # ------------------------------------------------------------ entry points

    def handle(self, msg: p.Request) -> p.Reply | Deferred:
        self.counters["requests"] += 1
        try:
            return self._handlers[type(msg)](msg)
        except KvbmError as e:
            return self.error_reply(msg.req, e)

    def complete(self, deferred: Deferred) -> p.Reply | Deferred:
        try:
            return deferred.finish(deferred.future)
        except KvbmError as e:
            return self.error_reply(deferred.req, e)
        except Exception as e:  # an unexpected failure off the loop must still answer
            log.exception("deferred request %d failed", deferred.req)
            return self.error_reply(deferred.req, KvbmError(f"internal error: {e}", ErrorCode.INTERNAL))

    def error_reply(self, req: int, e: KvbmError) -> p.ErrorReply:
        self.counters[f"error_{e.code.name.lower()}"] += 1
        return p.ErrorReply(req=req, code=int(e.code), message=e.message, retryable=e.retryable)

    def sweep(self, now: float | None = None) -> list[Lease]:
        ended = self.leases.expired(now)
        for lease in ended:
            log.info("lease of client %d (%s, pid %d) ended: %d pins dropped, %d unfinished blocks freed",
                     lease.client_id, lease.name, lease.pid, lease.num_pins(), lease.num_pending())
            self._end_lease(lease)
            self.counters["expired_leases"] += 1
        now = time.monotonic() if now is None else now
        for tier in self.tiers:
            tier.sweep(now)
        return ended

    def add_tier(self, tier: Tier) -> Tier:
        """Add a tier (before `recover`, so that recovered pools are attached to it); its requests
        are answered from now on. Tiers are asked for loads in the order they were added."""
        self.tiers.append(tier)
        self._handlers.update(tier.handlers())
        for pool_id, pool in self.pools.items():
            tier.attach(pool, self._namespaces[pool_id])
            pool.lower_tiers = any(t.below_g2 for t in self.tiers)
        return tier

    def open_cluster_tier(self, endpoint: PeerEndpoint) -> ClusterTier:
        """Turn on G4 (after G3: a lookup asks the disk first; before `recover`, so that recovered
        pools are registered with NIXL)."""
        return self.add_tier(ClusterTier.open(self.config, instance_id=self.instance_id, leases=self.leases,
                                              endpoint=endpoint))

    def open_disk_tier(self) -> DiskTier:
        """Turn on G3."""
        return self.add_tier(DiskTier(self.config, workers=functools.partial(self.workers.get, disk_tier.WORKER_KIND),
                                      events=self.events))

    def allocate(self, pool: BlockPool, hashes: list[bytes], client_id: int) -> list[int]:
        """`pool.allocate` for a client's store; every tier hears of it (`Store`)."""
        ids = pool.allocate(hashes, client_id)
        for tier in self.tiers:
            tier.on_allocated(pool, hashes)
        return ids

    def commit(self, pool: BlockPool, ids: list[int], checksums: list[int], priority: int) -> int:
        """`pool.commit` for a client's store; every tier hears of it (`Store`)."""
        n = pool.commit(ids, checksums, priority)
        for tier in self.tiers:
            tier.on_committed(pool, ids)
        return n

    @property
    def used_bytes(self) -> int:
        """Bytes of /dev/shm held by this coordinator's pools."""
        return sum(self._pool_bytes.values())

    def _emit(self, event: p.Event) -> None:
        self._events.append(event)
        if type(event) is p.BlockRemoved and event.tier == p.Tier.CPU:
            pool = self.pools.get(event.pool_id)
            if pool is not None:
                for tier in self.tiers:
                    tier.on_removed(pool, event.hashes)

    def flush(self) -> None:
        """Write the pools' deferred bookkeeping into shm (see `BlockPool.flush`)."""
        for pool in self.pools.values():
            pool.flush()

    def take_events(self) -> list[p.Event]:
        events, self._events = self._events, []
        return events

    def recover(self) -> int:
        """Adopt pools left by a dead coordinator of this instance; unlink unusable ones. Only our
        own segments are adopted or removed (see `shm`): another user's file, a link or a file
        open to others is left alone and logged, and new pools are named past it."""
        kept = 0
        for name in list_segments(pool_prefix(self.config.instance)):
            try:
                seg = PoolSegment.attach(name)
            except ForeignError as e:
                log.warning("leaving a segment that is not ours alone: %s", e)
                continue
            except FileNotFoundError:
                continue
            except (KvbmError, OSError) as e:
                log.warning("removing unusable segment %s: %s", name, e)
                unlink(name)
                continue
            if bytes(seg.header["instance"]).decode(errors="replace") != self.config.instance:
                seg.close()  # another instance whose name extends ours ("a" vs "a-pool-x")
                continue
            try:
                ns = msgspec.msgpack.decode(seg.namespace_bytes, type=Namespace)
                pool_id = int(seg.header["pool_id"])
                if ns.fingerprint != seg.fingerprint or pool_id in self.pools:
                    raise ValueError("namespace does not match its fingerprint")
                if self._reserved_bytes + seg.segment.size > self.config.cpu_cache_bytes:
                    raise ValueError("it does not fit in this coordinator's cpu_cache_gb")
            except (ValueError, msgspec.DecodeError) as e:
                log.warning("removing segment %s: %s", name, e)
                seg.close()
                unlink(name)
                continue
            seg.header["coordinator_pid"] = os.getpid()
            pool = self._add_pool(pool_id, seg, ns)
            n = pool.recover()
            kept += n
            log.info("recovered pool %d (%s) with %d registered blocks from %s", pool_id, ns.model, n, name)
        return kept

    def close(self) -> None:
        """Unlink every pool (clean shutdown); each one's `PoolCleared` event is left to publish."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        for tier in self.tiers:  # before the pools go: G4 leaves the cluster, so no peer reads them
            tier.close()
        for fut in self._creating.values():
            if fut.done() and fut.exception() is None:
                seg = fut.result()
                seg.close()
                unlink(seg.name)
        for pool in self.pools.values():
            name = pool.segment.name
            pool.close()
            unlink(name)
            self._emit(p.PoolCleared(pool_id=pool.pool_id, fingerprint=pool.fingerprint))
        self.pools.clear()

    # ------------------------------------------------------------ handlers

    def _hello(self, m: p.Hello) -> p.Reply:
        if m.protocol != p.PROTOCOL_VERSION:
            raise KvbmError(f"client speaks protocol {m.protocol}, coordinator {p.PROTOCOL_VERSION}",
                            ErrorCode.BAD_VERSION)
        lease = self.leases.open(m.name, m.pid)
        return p.HelloReply(req=m.req, client_id=lease.client_id, lease=lease.token, lease_ms=self.config.lease_ms,
                            instance=self.config.instance, instance_id=self.instance_id,
                            coordinator_pid=os.getpid(), events_endpoint=self.events_endpoint,
                            max_frame_bytes=self.config.max_frame_bytes)

    def _register_layout(self, m: p.RegisterLayout) -> p.Reply | Deferred:
        self.leases.get(m.lease)
        try:
            m.namespace.validate()
        except ValueError as e:
            raise RequestError(f"invalid namespace: {e}") from e
        size = len(msgspec.msgpack.encode(m.namespace))
        if size > MAX_NAMESPACE_BYTES:
            raise RequestError(f"namespace description is {size} bytes, at most {MAX_NAMESPACE_BYTES}")
        fp = m.namespace.fingerprint
        if fp in self._by_fingerprint:
            return self._pool_reply(m.req, self._by_fingerprint[fp])
        fut = self._creating.get(fp)
        if fut is None:
            if len(self.pools) + len(self._creating) >= self.config.max_pools:
                raise CapacityError(f"this instance has {len(self.pools) + len(self._creating)} pools, the most "
                                    f"it keeps (max_pools): no pool for {m.namespace.model[:64]!r}", ErrorCode.CAPACITY)
            fut = self._start_pool(m.namespace, m.cache_bytes)
        return Deferred(req=m.req, future=fut, finish=lambda done: self._pool_created(m.req, m.namespace, done))

    def _lookup(self, m: p.Lookup) -> p.Reply | Deferred:
        lease = self.leases.get(m.lease)
        pool = self._pool(m.pool_id)
        ids = pool.lookup(m.hashes)
        if len(ids) < len(m.hashes):
            staged = self._stage(m, pool, ids, [p.Tier.CPU] * len(ids), 0, [])
            if staged is not None:
                if m.pin:
                    lease.deferred_pins.add(m.req)
                return staged
        if m.pin and ids:
            lease.pin(pool, m.req, ids)
        return p.LookupReply(req=m.req, block_ids=ids, tiers=[p.Tier.CPU] * len(ids))

    def _stage(self, m: p.Lookup, pool: BlockPool, ids: list[int], tiers: list[int], first: int,
               held: list[Staging]) -> Deferred | None:
        """Ask the tiers from `first` on to stage the rest of the lookup's prefix after `ids`."""
        for i in range(first, len(self.tiers)):
            staging = self.tiers[i].prepare_load(pool, m.hashes, ids)
            if staging is not None:
                held.append(staging)
                return Deferred(req=m.req, future=staging.future,
                                finish=lambda _: self._staged(m, pool, staging, tiers, i + 1, held))
        return None

    def _staged(self, m: p.Lookup, pool: BlockPool, staging: Staging, tiers: list[int], next_tier: int,
                held: list[Staging]) -> p.Reply | Deferred:
        """A staging is done: ask the next tiers for what it did not have, else answer with the
        verified prefix (pinned, unless the client cancelled the lookup meanwhile), then release
        every staging's pins."""
        more = None
        try:
            ids, got = staging.result()
            tiers = tiers + got[len(tiers):]
            if len(ids) < len(m.hashes):
                more = self._stage(m, pool, ids, tiers, next_tier, held)
                if more is not None:
                    return more
            if m.pin:
                lease = self.leases.get(m.lease)
                lease.deferred_pins.discard(m.req)
                if m.req in lease.cancelled:
                    lease.cancelled.discard(m.req)
                    log.info("client %d (%s) cancelled lookup %d while it waited for a tier: %d block(s) not pinned",
                             lease.client_id, lease.name, m.req, len(ids))
                    return p.LookupReply(req=m.req, block_ids=[], tiers=[])
                if ids:
                    lease.pin(pool, m.req, ids)
            return p.LookupReply(req=m.req, block_ids=ids, tiers=tiers)
        finally:
            if more is None:
                for done in held:
                    done.release()

    def _allocate(self, m: p.Allocate) -> p.Reply:
        lease = self.leases.get(m.lease)
        pool = self._pool(m.pool_id)
        ids = self.allocate(pool, m.hashes, lease.client_id)
        mine = [b for b in ids if b >= 0]
        if mine:
            lease.pending.setdefault(pool.pool_id, set()).update(mine)
            lease.remember(m.req, Held(pool_id=pool.pool_id, block_ids=mine, pinned=False))
        return p.AllocateReply(req=m.req, block_ids=ids)

    def _commit(self, m: p.Commit) -> p.Reply:
        lease = self.leases.get(m.lease)
        pool = self._pool(m.pool_id)
        if len(m.checksums) != len(m.block_ids):
            raise RequestError(f"{len(m.block_ids)} blocks but {len(m.checksums)} checksums")
        self._check_pending(pool, lease, m.block_ids)
        lease.pending[pool.pool_id].difference_update(m.block_ids)
        return p.OkReply(req=m.req, count=self.commit(pool, m.block_ids, m.checksums, m.priority))

    def _release(self, m: p.Release) -> p.Reply:
        lease = self.leases.get(m.lease)
        pool = self._pool(m.pool_id)
        self._check_ids(pool, m.block_ids)
        held = lease.pins.get(pool.pool_id, Counter())
        want = Counter(m.block_ids)
        missing = [b for b, n in want.items() if held[b] < n]
        if missing:
            raise RequestError(f"client {lease.client_id} holds no pin on blocks {missing[:8]}", ErrorCode.NOT_PINNED)
        self._unpin(pool, lease, want)
        return p.OkReply(req=m.req, count=len(m.block_ids))

    def _free(self, m: p.Free) -> p.Reply:
        lease = self.leases.get(m.lease)
        pool = self._pool(m.pool_id)
        self._check_pending(pool, lease, m.block_ids)
        pool.free(m.block_ids)
        lease.pending[pool.pool_id].difference_update(m.block_ids)
        return p.OkReply(req=m.req, count=len(m.block_ids))

    def _touch(self, m: p.Touch) -> p.Reply:
        self.leases.get(m.lease)
        pool = self._pool(m.pool_id)
        if m.lookups:
            return p.OkReply(req=m.req, count=pool.used(m.hashes, m.uses, m.lookups, m.lookup_blocks, m.hit_blocks))
        return p.OkReply(req=m.req, count=pool.touch(m.hashes, m.priority))

    def _invalidate(self, m: p.Invalidate) -> p.Reply:
        """Drop the listed Registered blocks whose bytes, checksummed here again, differ from
        their recorded checksum; blocks that verify are kept (and the claim logged)."""
        lease = self.leases.get(m.lease)
        pool = self._pool(m.pool_id)
        self._check_ids(pool, m.block_ids)
        listed = [b for b in dict.fromkeys(m.block_ids) if pool.state_of(b) == BlockState.REGISTERED]
        bad = [b for b in listed if cpu_copy.checksum(pool.segment.block(b)) != int(pool.checksum_of(b))]
        n = pool.invalidate(bad) if bad else 0
        if n:
            log.warning("client %d (%s) invalidated %d block(s) of pool %d whose bytes fail their checksum: %s",
                        lease.client_id, lease.name, n, pool.pool_id, m.reason or "no reason given")
        if len(listed) > len(bad):
            log.warning("client %d (%s) reported %d block(s) of pool %d bad whose bytes match their checksum: "
                        "kept (%s)", lease.client_id, lease.name, len(listed) - len(bad), pool.pool_id,
                        m.reason or "no reason given")
        return p.OkReply(req=m.req, count=n)

    def _cancel(self, m: p.Cancel) -> p.Reply:
        lease = self.leases.get(m.lease)
        if m.target in lease.deferred_pins:  # still waiting for G3: `_fetched` will not pin
            lease.cancelled.add(m.target)
            return p.OkReply(req=m.req, count=0)
        held = lease.recent.pop(m.target, None)
        if held is None or held.pool_id not in self.pools:
            return p.OkReply(req=m.req, count=0)
        pool = self.pools[held.pool_id]
        if held.pinned:
            pins = lease.pins.get(pool.pool_id, Counter())
            want = Counter(held.block_ids)
            n = self._unpin(pool, lease, Counter({b: min(k, pins[b]) for b, k in want.items() if pins[b]}))
        else:
            mine = lease.pending.get(pool.pool_id, set())
            ids = [b for b in held.block_ids if b in mine]
            if ids:
                pool.free(ids)
                mine.difference_update(ids)
            n = len(ids)
        log.info("client %d (%s) gave up on request %d: %d block(s) %s", lease.client_id, lease.name, m.target, n,
                 "unpinned" if held.pinned else "freed")
        return p.OkReply(req=m.req, count=n)

    def _clear(self, m: p.Clear) -> p.Reply:
        """Drop every Registered block of one pool, or of each pool whose model contains `m.model`."""
        lease = self.leases.get(m.lease)
        pools = [self._pool(m.pool_id)] if m.pool_id >= 0 else [q for q in self.pools.values() if m.model in q.model]
        n = sum(pool.invalidate([b for _, b in pool.registered()]) for pool in pools)
        self.counters["cleared_blocks"] += n
        log.info("client %d (%s) cleared %d block(s) from %d pool(s)", lease.client_id, lease.name, n, len(pools))
        return p.OkReply(req=m.req, count=n)

    def _heartbeat(self, m: p.Heartbeat) -> p.Reply:
        self.leases.get(m.lease)
        return p.OkReply(req=m.req)

    def _goodbye(self, m: p.Goodbye) -> p.Reply:
        lease = self.leases.close(m.lease)
        if lease is not None:
            self._end_lease(lease)
        return p.OkReply(req=m.req)

    def _stats(self, m: p.Stats) -> p.Reply:
        now = time.monotonic()
        pools = [
            p.PoolStats(pool_id=pool.pool_id, model=pool.model, fingerprint=pool.fingerprint,
                        segment=pool.segment.name, num_blocks=pool.num_blocks,
                        block_bytes=pool.segment.block_bytes, counters=pool.counters(), **pool.stats())
            for pool in self.pools.values()
        ]
        clients = [p.ClientInfo(client_id=lease.client_id, name=lease.name, pid=lease.pid, pins=lease.num_pins(),
                                pending=lease.num_pending(), expires_in_ms=int((lease.expires_at - now) * 1000))
                   for lease in self.leases]
        tier_fields = {}
        for tier in self.tiers:
            tier_fields.update(tier.stats())
        return p.StatsReply(req=m.req, instance=self.config.instance, instance_id=self.instance_id, pid=os.getpid(),
                            uptime_s=now - self.started, cpu_cache_bytes=self.config.cpu_cache_bytes,
                            cpu_used_bytes=self.used_bytes, pools=pools, clients=clients,
                            counters=dict(self.counters), **tier_fields)

    # ------------------------------------------------------------ helpers

    def _pool(self, pool_id: int) -> BlockPool:
        pool = self.pools.get(pool_id)
        if pool is None:
            raise RequestError(f"unknown pool {pool_id}", ErrorCode.UNKNOWN_POOL)
        return pool

    @staticmethod
    def _check_ids(pool: BlockPool, ids: list[int]) -> None:
        bad = [b for b in ids if not 0 <= b < pool.num_blocks]
        if bad:
            raise RequestError(f"unknown block ids {bad[:8]} (pool {pool.pool_id} has {pool.num_blocks} blocks)",
                               ErrorCode.UNKNOWN_BLOCK)

    def _check_pending(self, pool: BlockPool, lease: Lease, ids: list[int]) -> None:
        self._check_ids(pool, ids)
        if len(set(ids)) != len(ids):
            raise RequestError("block ids repeat within the batch")
        mine = lease.pending.get(pool.pool_id, set())
        foreign = [b for b in ids if b not in mine]
        if foreign:
            raise RequestError(f"blocks {foreign[:8]} are not being written by client {lease.client_id}",
                               ErrorCode.NOT_OWNER)

    @staticmethod
    def _unpin(pool: BlockPool, lease: Lease, pins: Counter) -> int:
        """Drop `pins` (block -> count), all held by `lease`; returns how many."""
        ids = list(pins.elements())
        if ids:
            pool.unpin(ids)
            held = lease.pins[pool.pool_id]
            held.subtract(pins)
            for b in pins:
                if held[b] == 0:
                    del held[b]
        return len(ids)

    def _end_lease(self, lease: Lease) -> None:
        for pool_id, pins in lease.pins.items():
            if pool_id in self.pools and pins:
                self.pools[pool_id].unpin(list(pins.elements()))
        for pool_id, pending in lease.pending.items():
            if pool_id in self.pools and pending:
                self.pools[pool_id].free(sorted(pending))
        lease.pins.clear()
        lease.pending.clear()
        lease.recent.clear()
        for tier in self.tiers:
            tier.end_lease(lease)

    def _start_pool(self, ns: Namespace, cache_bytes: int) -> concurrent.futures.Future:
        budget = self.config.cpu_cache_bytes
        free = budget - self._reserved_bytes
        want = cache_bytes or budget // ns.tp_size
        size_cap = min(want, free)
        num_blocks = PoolSegment.blocks_for(size_cap, ns.kv.block_bytes)
        if num_blocks < 1:
            raise CapacityError(
                f"cpu cache budget exhausted: {free / 2**20:.1f} MiB of {budget / 2**20:.1f} MiB left, "
                f"a pool for {ns.model!r} needs at least {PoolSegment.size_for(1, ns.kv.block_bytes) / 2**20:.2f} MiB")
        size = PoolSegment.size_for(num_blocks, ns.kv.block_bytes)
        pool_id = free_pool_id(self.config.instance, max([*self.pools, *self._pending_ids(), -1]) + 1)
        fp = ns.fingerprint
        self._reserved_bytes += size
        fut = self._executor.submit(
            PoolSegment.create, pool_name(self.config.instance, pool_id), pool_id=pool_id,
            num_blocks=num_blocks, block_bytes=ns.kv.block_bytes, instance=self.config.instance,
            segment_id=uuid.uuid4().hex, fingerprint=fp, namespace=msgspec.msgpack.encode(ns))
        fut.pool_id, fut.size = pool_id, size
        self._creating[fp] = fut
        log.info("creating pool %d for %s: %d blocks of %d bytes (%.1f MiB)", pool_id, ns.model, num_blocks,
                 ns.kv.block_bytes, size / 2**20)
        return fut

    def _pending_ids(self) -> list[int]:
        return [f.pool_id for f in self._creating.values()]

    def _pool_created(self, req: int, ns: Namespace, fut: concurrent.futures.Future) -> p.Reply:
        """Runs on the loop for every request that waited on the creation `fut`."""
        fp = ns.fingerprint
        if fp not in self._by_fingerprint:
            if self._creating.get(fp) is fut:
                del self._creating[fp]
                self._reserved_bytes -= fut.size
            self._add_pool(fut.pool_id, fut.result(), ns)  # a failed creation raises for every waiter
        return self._pool_reply(req, self._by_fingerprint[fp])

    def _add_pool(self, pool_id: int, seg: PoolSegment, ns: Namespace) -> BlockPool:
        pool = BlockPool(pool_id, seg, ns.model, self._emit)
        self.pools[pool_id] = pool
        self._pool_bytes[pool_id] = seg.segment.size
        self._reserved_bytes += seg.segment.size
        self._by_fingerprint[ns.fingerprint] = pool_id
        self._namespaces[pool_id] = ns
        pool.lower_tiers = any(t.below_g2 for t in self.tiers)  # read by clients (hash_index)
        for tier in self.tiers:
            tier.attach(pool, ns)
        return pool

    def _pool_reply(self, req: int, pool_id: int) -> p.PoolReply:
        pool = self.pools[pool_id]
        return p.PoolReply(req=req, pool_id=pool_id, segment=pool.segment.name, segment_id=pool.segment.segment_id,
                           num_blocks=pool.num_blocks, block_bytes=pool.segment.block_bytes)
