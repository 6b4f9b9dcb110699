"""One G2 pool's block state. Runs in the coordinator process only; single-threaded.

The shm block table (`shm.PoolSegment.table`) is the state of record: state, hash, ref count,
checksum, priority, last use. This class adds the indexes that make every operation O(1) per
block: a free list, `registry` (hash -> Registered block), `pending` (hash -> Partial block) and
the inactive set (Registered blocks with no pin), ordered by priority then least recent use.

Contract (each call takes a batch; the caller has already checked ownership and ids):
- `lookup(hashes)`: the longest prefix of `hashes` that is Registered -> block ids.
- `pin(ids, client)` / `unpin(ids)`: reference counts; a pinned block is never evicted.
- `allocate(hashes, client)`: one Partial block per new hash, or a `protocol` sentinel.
  Room comes from the free list, then by evicting the inactive set (lowest priority, then LRU).
- `commit(ids, checksums, priority)`: Partial -> Registered; a hash registered meanwhile is
  deduplicated (the new block goes back to the free list).
- `free(ids)`: Partial -> Reset. `invalidate(ids)`: forget Registered blocks (bad bytes); a
  pinned one is freed when its last pin goes.
- For the disk tier: `eviction_order(n)` (the next blocks `allocate` would evict), `hash_of`,
  `set_tier(ids, tier)`, and `unpin_cold(ids, pinned_ns)`, which puts a block that a background
  copy pinned and nobody used meanwhile back at the eviction end rather than the recent end.
Every registration and removal is reported to `on_event` as a protocol event. Lookups keep the
request path short: their per-block bookkeeping in shm (last use, hit counts) and their counters
are batched and written by `flush()`, which the server runs when idle for a moment; every other
operation writes its counters at once, so a post-mortem read sees them.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections import OrderedDict
from typing import Callable

import numpy as np

from ..protocol import ALREADY_STORED, IN_FLIGHT, NO_ROOM, BlockRemoved, BlockStored, Event, Tier
from ..shm import COUNTER_NAMES, BlockState, PoolSegment

_COUNTER = {name: i for i, name in enumerate(COUNTER_NAMES)}


class BlockPool:
    def __init__(self, pool_id: int, segment: PoolSegment, model: str, on_event: Callable[[Event], None]):
        self.pool_id = pool_id
        self.segment = segment
        self.model = model
        self.fingerprint = segment.fingerprint
        self.table = segment.table
        self.num_blocks = segment.num_blocks
        self._on_event = on_event
        self.registry: dict[bytes, int] = {}
        self.pending: dict[bytes, int] = {}
        self._hash: list[bytes | None] = [None] * self.num_blocks
        self._inactive: dict[int, OrderedDict[int, None]] = {}  # priority -> blocks, least recent first
        self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))
        self._used: list[list[int]] = []  # lookup hits not yet written to the table (see flush)
        self._counts = [0] * len(COUNTER_NAMES)  # lookup counter increments not yet in the header

    # ------------------------------------------------------------ recovery

    def recover(self) -> int:
        """Rebuild the indexes from a table left by a dead coordinator.

        Registered blocks stay matchable (their checksums still vouch for their bytes); pins
        and unfinished blocks of the dead coordinator's clients are dropped. Returns the number
        of blocks kept.
        """
        t = self.table
        registered = np.flatnonzero(t["state"] == BlockState.REGISTERED)
        others = np.flatnonzero(t["state"] != BlockState.REGISTERED)
        self._write(others, state=BlockState.RESET, refcount=0, owner=0)
        self._write(registered, refcount=0, owner=0)
        order = registered[np.argsort(t["last_use_ns"][registered], kind="stable")]
        self._free = sorted(others.tolist(), reverse=True)
        for b in order.tolist():
            h = bytes(t["hash"][b])
            if h in self.registry:  # duplicate after a crash mid-commit: keep one
                self._write([b], state=BlockState.RESET)
                self._free.append(b)
                continue
            self.registry[h] = b
            self._hash[b] = h
            self._lru(int(t["priority"][b]))[b] = None
        return len(self.registry)

    # ------------------------------------------------------------ reads

    def lookup(self, hashes: list[bytes]) -> list[int]:
        ids = list(map(self.registry.get, hashes))
        if None in ids:
            del ids[ids.index(None):]
        counts = self._counts
        counts[_COUNTER["lookups"]] += 1
        counts[_COUNTER["lookup_blocks"]] += len(hashes)
        if ids:
            counts[_COUNTER["hit_blocks"]] += len(ids)
            self._used.append(ids)
            self._touch_inactive(ids)
        return ids

    def flush(self) -> None:
        """Write what lookups deferred into the shm table and header: last use, hits, counters.
        The server calls it when it has been idle for ~2 ms, and every 10 ms under load."""
        if self._used:
            idx = np.concatenate([np.asarray(ids, np.int64) for ids in self._used])
            self._used = []
            used, hits = np.unique(idx, return_counts=True)  # np.add.at on a strided field is ~40x slower
            self._write(used, last_use_ns=time.monotonic_ns(), hits=self.table["hits"][used] + hits)
        if any(self._counts):
            self.segment.counters[:len(self._counts)] += np.asarray(self._counts, np.uint64)
            self._counts = [0] * len(COUNTER_NAMES)

    def state_of(self, block_id: int) -> int:
        return int(self.table["state"][block_id])

    def stats(self) -> dict[str, int]:
        t = self.table
        return {
            "free": len(self._free),
            "partial": len(self.pending),
            "registered": len(self.registry),
            "pinned": int(np.count_nonzero(t["refcount"])),
            "inactive": sum(len(d) for d in self._inactive.values()),
        }

    def counters(self) -> dict[str, int]:
        """Counter values including increments not flushed yet; reads only (safe from a scrape thread)."""
        shared = self.segment.counters.tolist()
        return {name: int(shared[i]) + pending for i, (name, pending) in enumerate(zip(COUNTER_NAMES, self._counts))}

    # ------------------------------------------------------------ pins

    def pin(self, ids: list[int], client_id: int) -> None:
        for b in ids:
            if self.table["refcount"][b] == 0:
                self._remove_inactive(b)
        idx = np.asarray(ids)
        gen = self.table["generation"]
        np.add.at(gen, idx, 1)
        np.add.at(self.table["refcount"], idx, 1)
        self.table["owner"][idx] = client_id
        np.add.at(gen, idx, 1)

    def unpin(self, ids: list[int]) -> None:
        idx = np.asarray(ids)
        gen = self.table["generation"]
        np.add.at(gen, idx, 1)
        np.subtract.at(self.table["refcount"], idx, 1)
        np.add.at(gen, idx, 1)
        for b in set(ids):
            if self.table["refcount"][b] == 0:
                if self.table["state"][b] == BlockState.REGISTERED:
                    self._lru(int(self.table["priority"][b]))[b] = None
                else:  # invalidated while pinned
                    self._release_block(b)

    # ------------------------------------------------------------ stores

    def allocate(self, hashes: list[bytes], client_id: int) -> list[int]:
        out = []
        new_ids, new_hashes, evicted = [], [], []
        for h in hashes:
            if h in self.registry:
                out.append(ALREADY_STORED)
                continue
            if h in self.pending:
                out.append(IN_FLIGHT)
                continue
            b = self._take(evicted)
            if b is None:
                out.append(NO_ROOM)
                continue
            self.pending[h] = b
            self._hash[b] = h
            out.append(b)
            new_ids.append(b)
            new_hashes.append(h)
        self._count("dedup_blocks", out.count(ALREADY_STORED))
        self._count("no_room_blocks", out.count(NO_ROOM))
        if evicted:
            self._count("evicted_blocks", len(evicted))
            self._on_event(BlockRemoved(self.pool_id, self.fingerprint, evicted, Tier.CPU))
        if new_ids:
            idx = np.asarray(new_ids)
            self._write(idx, state=BlockState.PARTIAL, owner=client_id, refcount=0, hits=0, checksum=0,
                        alloc_seq=self.table["alloc_seq"][idx] + 1,
                        hash=np.frombuffer(b"".join(new_hashes), "V16"))
        return out

    def commit(self, ids: list[int], checksums: list[int], priority: int) -> int:
        stored_ids, stored_hashes, dup = [], [], []
        for b in ids:
            h = self._hash[b]
            del self.pending[h]
            if h in self.registry:
                dup.append(b)
                continue
            self.registry[h] = b
            stored_ids.append(b)
            stored_hashes.append(h)
        if stored_ids:
            keep = {b: c for b, c in zip(ids, checksums)}
            idx = np.asarray(stored_ids)
            self._write(idx, state=BlockState.REGISTERED, refcount=0, priority=priority,
                        checksum=np.asarray([keep[b] for b in stored_ids], np.uint64),
                        last_use_ns=time.monotonic_ns(), tier=Tier.CPU)
            lru = self._lru(priority)
            for b in stored_ids:
                lru[b] = None
            self._count("stored_blocks", len(stored_ids))
            self._on_event(BlockStored(self.pool_id, self.fingerprint, stored_hashes, Tier.CPU))
        for b in dup:
            self._count("dedup_blocks", 1)
            self._release_block(b)
        return len(stored_ids)

    def free(self, ids: list[int]) -> None:
        for b in ids:
            del self.pending[self._hash[b]]
            self._release_block(b)
        self._count("freed_blocks", len(ids))

    def invalidate(self, ids: list[int]) -> int:
        removed = []
        for b in set(ids):
            h = self._hash[b]
            if self.table["state"][b] != BlockState.REGISTERED or self.registry.get(h) != b:
                continue
            del self.registry[h]
            removed.append(h)
            if self.table["refcount"][b] == 0:
                self._remove_inactive(b)
                self._release_block(b)
            else:
                self._write([b], state=BlockState.RESET)
        if removed:
            self._count("invalidated_blocks", len(removed))
            self._on_event(BlockRemoved(self.pool_id, self.fingerprint, removed, Tier.CPU))
        return len(removed)

    def touch(self, hashes: list[bytes], priority: int | None) -> int:
        ids = [b for b in (self.registry.get(h) for h in hashes) if b is not None]
        if not ids:
            return 0
        if priority is not None:
            for b in ids:
                if self._remove_inactive(b):
                    self._lru(priority)[b] = None
            self._write(np.asarray(ids), priority=priority)
        self._write(np.asarray(ids), last_use_ns=time.monotonic_ns())
        self._touch_inactive(ids)
        return len(ids)

    # ------------------------------------------------------------ disk tier

    @property
    def num_free(self) -> int:
        return len(self._free)

    def hash_of(self, block_id: int) -> bytes | None:
        return self._hash[block_id]

    def eviction_order(self, limit: int) -> list[int]:
        """The next `limit` (or fewer) Registered blocks `allocate` would evict, first first."""
        out: list[int] = []
        for prio in sorted(p for p, d in self._inactive.items() if d):
            out.extend(itertools.islice(self._inactive[prio], limit - len(out)))
            if len(out) >= limit:
                break
        return out

    def set_tier(self, ids: list[int], tier: int) -> None:
        self._write(ids, tier=tier)

    def unpin_cold(self, ids: list[int], pinned_ns: int) -> None:
        """`unpin` for blocks pinned by a background copy at `pinned_ns` (monotonic): a block
        nobody used since goes back to the eviction end of its priority, not the recent end."""
        self.flush()  # last use must include the lookups not yet written
        self.unpin(ids)
        t = self.table
        for b in dict.fromkeys(reversed(ids)):  # the first of `ids` ends up first in line
            if t["refcount"][b] == 0 and t["state"][b] == BlockState.REGISTERED and t["last_use_ns"][b] <= pinned_ns:
                self._inactive[int(t["priority"][b])].move_to_end(b, last=False)

    # ------------------------------------------------------------ internals

    def _take(self, evicted: list[bytes]) -> int | None:
        """A free block, or the inactive block to evict (its hash is appended to `evicted`)."""
        if self._free:
            return self._free.pop()
        for prio in sorted(p for p, lru in self._inactive.items() if lru):
            b, _ = self._inactive[prio].popitem(last=False)
            h = self._hash[b]
            del self.registry[h]
            evicted.append(h)
            return b
        return None

    def _lru(self, priority: int) -> OrderedDict[int, None]:
        lru = self._inactive.get(priority)
        if lru is None:
            lru = self._inactive[priority] = OrderedDict()
        return lru

    def _release_block(self, b: int) -> None:
        self._hash[b] = None
        self._write([b], state=BlockState.RESET, refcount=0, owner=0, checksum=0)
        self._free.append(b)

    def _remove_inactive(self, b: int) -> bool:
        lru = self._inactive.get(int(self.table["priority"][b]))
        if lru is not None and b in lru:
            del lru[b]
            return True
        return False

    def _touch_inactive(self, ids: list[int]) -> None:
        if len(self._inactive) == 1:  # the common case: one priority and nothing pinned
            try:
                collections.deque(map(next(iter(self._inactive.values())).move_to_end, ids), 0)
                return
            except KeyError:  # a pinned block (not inactive): take the per-block path
                pass
        prio = self.table["priority"]
        for b in ids:
            lru = self._inactive.get(int(prio[b]))
            if lru is not None and b in lru:
                lru.move_to_end(b)

    def _write(self, ids, **fields) -> None:
        """Seqlock-bracketed update of block records (the coordinator is the only writer)."""
        idx = np.asarray(ids, np.int64)
        if not len(idx):
            return
        t = self.table
        t["generation"][idx] += 1
        for name, value in fields.items():
            t[name][idx] = value
        t["generation"][idx] += 1

    def _count(self, name: str, n: int) -> None:
        self.segment.counters[_COUNTER[name]] += n
