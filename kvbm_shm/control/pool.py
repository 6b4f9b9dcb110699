"""One G2 pool's block state. Runs in the coordinator process only; single-threaded.

The shm block table (`shm.PoolSegment.table`) is the state of record: state, hash, ref count,
checksum, priority, last use. This class adds the indexes that make every operation O(1) per
block: a free list, the registry (hash -> Registered block), `pending` (hash -> Partial block)
and the eviction queue (`kvbm_shm.eviction`: Registered blocks with no pin, lowest priority
class first, then least recent use). The registry gains hashes only in `_register` and loses
one only in `_unregister`, and both mirror the change into the segment's hash index
(`hash_index`), which clients probe to answer lookups without a round trip: an entry is added with
its registration and removed before its block can change.

Its face, the only way in for the coordinator and the tiers (each call takes a batch; the caller
has already checked ownership and ids); nobody else touches the table or the registry:

Lifecycle
- `lookup(hashes)`: the longest prefix of `hashes` that is Registered -> block ids.
  `used(hashes, uses, lookups, lookup_blocks, hit_blocks)`: a client's batched report of lookups it
  answered from the hash index; counted and kept in the eviction order as `lookup` keeps its own.
- `pin(ids, client)` / `unpin(ids)`: reference counts; a pinned block is never evicted.
  `unpin_cold(ids, pinned_ns)`: `unpin` for blocks a background copy pinned at `pinned_ns`
  (monotonic): a block nobody used since goes to the eviction end, not the recent end.
- `allocate(hashes, client)`: one Partial block per new hash, or a `protocol` sentinel.
  Room comes from the free list, then by evicting from the eviction queue.
- `commit(ids, checksums, priority)`: Partial -> Registered; a hash registered meanwhile is
  deduplicated (the new block goes back to the free list).
- `free(ids)`: Partial -> Reset. `invalidate(ids)`: forget Registered blocks (bad bytes); a
  pinned one is freed when its last pin goes. `touch(hashes, priority)`: recent use, new priority.
- `set_tier(ids, tier)`: where else the blocks' bytes live (`protocol.Tier`; DISK: evicting the
  block loses nothing).
- Staging (a tier moving blocks into G2): `allocate_staging(hashes)` (Partial blocks owned by no
  client), then `register_staged(ids, checksums, priorities, tier)` for the ones whose bytes
  arrived and verified (the rest go back with `free`).

Reads
- `block_of(hash)` (Registered block or None), `registered()` ((hash, block) of every
  Registered block), `hash_of(b)`, `state_of(b)`.
- Per-block record fields, vectorized (ids in, numpy array out): `checksum_of`, `priority_of`,
  `tier_of`, `hits_of` (lookup hits, flushed first), `generation_of` (the record's seqlock
  generation: it changes whenever the record does).
- `eviction_order(n)` (the next blocks `allocate` would evict), `num_free`, `stats()`,
  `counters()`; `segment` (names and bytes of the shm segment, for jobs that copy).

The coordinator sets `lower_tiers` (whether a tier below G2 could hold what G2 lacks: clients
then ask about a request their hash index answers only in part) and calls `close()` when it stops
cleanly (the index is closed first, so clients that still map it ask the coordinator instead).

Every registration and removal is reported to `on_event` as a protocol event. Lookups keep the
request path short: their per-block bookkeeping in shm (last use, hit counts) and their counters
are batched and written by `flush()`, which the server runs when idle for a moment; every other
operation writes its counters at once, so a post-mortem read sees them.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable, Iterable

import numpy as np

from ..eviction import EvictionQueue
from ..protocol import ALREADY_STORED, IN_FLIGHT, NO_ROOM, BlockRemoved, BlockStored, Event, Tier
from ..shm import COUNTER_NAMES, BlockState, PoolSegment

_COUNTER = {name: i for i, name in enumerate(COUNTER_NAMES)}


class BlockPool:
    def __init__(self, pool_id: int, segment: PoolSegment, model: str, on_event: Callable[[Event], None]):
        self.pool_id = pool_id
        self.segment = segment
        self.model = model
        self.fingerprint = segment.fingerprint
        self.num_blocks = segment.num_blocks
        self._table = segment.table
        self._index = segment.index
        self._on_event = on_event
        self._registry: dict[bytes, int] = {}
        self._pending: dict[bytes, int] = {}
        self._hash: list[bytes | None] = [None] * self.num_blocks
        self._queue = EvictionQueue(self.num_blocks)  # Registered blocks with no pin
        self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))
        self._used: list[tuple[list[int], int | list[int]]] = []  # hits not yet in the table (see flush): ids, uses
        self._counts = [0] * len(COUNTER_NAMES)  # lookup counter increments not yet in the header

    # ------------------------------------------------------------ recovery

    def recover(self) -> int:
        """Rebuild the indexes from a table left by a dead coordinator.

        Registered blocks stay matchable (their checksums still vouch for their bytes); pins
        and unfinished blocks of the dead coordinator's clients are dropped. Returns the number
        of blocks kept.
        """
        t = self._table
        registered = np.flatnonzero(t["state"] == BlockState.REGISTERED)
        others = np.flatnonzero(t["state"] != BlockState.REGISTERED)
        self._index.clear()  # rebuilt below from the table, the state of record
        self._write(others, state=BlockState.RESET, refcount=0, owner=0)
        self._write(registered, refcount=0, owner=0)
        order = registered[np.argsort(t["last_use_ns"][registered], kind="stable")]
        self._free = sorted(others.tolist(), reverse=True)
        kept: dict[bytes, int] = {}
        for b in order.tolist():
            h = bytes(t["hash"][b])
            if h in kept:  # duplicate after a crash mid-commit: keep one
                self._write([b], state=BlockState.RESET)
                self._free.append(b)
                continue
            kept[h] = b
            self._hash[b] = h
            self._queue.push(b, int(t["priority"][b]))
        self._register(list(kept), list(kept.values()))
        return len(self._registry)

    # ------------------------------------------------------------ reads

    def lookup(self, hashes: list[bytes]) -> list[int]:
        ids = list(map(self._registry.get, hashes))
        if None in ids:
            del ids[ids.index(None):]
        counts = self._counts
        counts[_COUNTER["lookups"]] += 1
        counts[_COUNTER["lookup_blocks"]] += len(hashes)
        if ids:
            counts[_COUNTER["hit_blocks"]] += len(ids)
            self._used.append((ids, 1))
            self._queue.touch(ids)
        return ids

    def used(self, hashes: list[bytes], uses: list[int], lookups: int, lookup_blocks: int, hit_blocks: int) -> int:
        """A client's report of `lookups` it answered from the hash index: they asked for
        `lookup_blocks` blocks and found `hit_blocks`, the blocks of `hashes` (in order of first
        use), `uses[i]` times the block of `hashes[i]`. Counted and kept as `lookup` keeps its own;
        returns how many of the hashes are still cached."""
        found = [(b, n) for b, n in zip(map(self._registry.get, hashes), uses) if b is not None]
        counts = self._counts
        counts[_COUNTER["lookups"]] += lookups
        counts[_COUNTER["lookup_blocks"]] += lookup_blocks
        counts[_COUNTER["hit_blocks"]] += hit_blocks
        if found:
            ids = [b for b, _ in found]
            self._used.append((ids, [n for _, n in found]))
            self._queue.touch(ids)
        return len(found)

    def flush(self) -> None:
        """Write what lookups deferred into the shm table and header: last use, hits, counters.
        The server calls it when it has been idle for ~2 ms, and every 2 ms under load."""
        if self._used:
            total = sum(len(ids) for ids, _ in self._used)
            idx = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in self._used), np.int64, count=total)
            uses = np.ones(total, np.int64)
            at = 0
            for ids, n in self._used:
                if n != 1:
                    uses[at:at + len(ids)] = n
                at += len(ids)
            self._used = []
            # hits per block by sorting (np.add.at on a strided field is ~40x slower, np.unique ~3x)
            order = np.argsort(idx, kind="stable")
            idx, uses = idx[order], uses[order]
            starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
            used = idx[starts]
            hits = self._table["hits"][used] + np.add.reduceat(uses, starts)
            self._write(used, last_use_ns=time.monotonic_ns(), hits=np.minimum(hits, 2**32 - 1))
        if any(self._counts):
            self.segment.counters[:len(self._counts)] += np.asarray(self._counts, np.uint64)
            self._counts = [0] * len(COUNTER_NAMES)

    def block_of(self, h: bytes) -> int | None:
        return self._registry.get(h)

    def registered(self) -> list[tuple[bytes, int]]:
        return list(self._registry.items())

    def hash_of(self, block_id: int) -> bytes | None:
        return self._hash[block_id]

    def state_of(self, block_id: int) -> int:
        return int(self._table["state"][block_id])

    def checksum_of(self, ids) -> np.ndarray:
        return self._table["checksum"][ids]

    def priority_of(self, ids) -> np.ndarray:
        return self._table["priority"][ids]

    def tier_of(self, ids) -> np.ndarray:
        return self._table["tier"][ids]

    def hits_of(self, ids) -> np.ndarray:
        self.flush()  # hits of lookups not written yet count too
        return self._table["hits"][ids]

    def generation_of(self, ids) -> np.ndarray:
        return self._table["generation"][ids]

    @property
    def num_free(self) -> int:
        return len(self._free)

    def eviction_order(self, limit: int) -> list[int]:
        """The next `limit` (or fewer) Registered blocks `allocate` would evict, first first."""
        return self._queue.order(limit)

    def stats(self) -> dict[str, int]:
        return {
            "free": len(self._free),
            "partial": len(self._pending),
            "registered": len(self._registry),
            "pinned": int(np.count_nonzero(self._table["refcount"])),
            "inactive": len(self._queue),
        }

    def counters(self) -> dict[str, int]:
        """Counter values including increments not flushed yet; reads only (safe from a scrape thread)."""
        shared = self.segment.counters.tolist()
        return {name: int(shared[i]) + pending for i, (name, pending) in enumerate(zip(COUNTER_NAMES, self._counts))}

    @property
    def lower_tiers(self) -> bool:
        return self._index.lower_tiers

    @lower_tiers.setter
    def lower_tiers(self, value: bool) -> None:
        self._index.lower_tiers = value

    def close(self) -> None:
        """The pool goes away (clean stop): its hash index is closed, then the segment unmapped."""
        self._index.close()
        del self._index, self._table
        self.segment.close()

    # ------------------------------------------------------------ pins

    def pin(self, ids: list[int], client_id: int) -> None:
        refcount = self._table["refcount"]
        for b in ids:
            if refcount[b] == 0:
                self._queue.remove(b)
        idx = np.asarray(ids)
        gen = self._table["generation"]
        np.add.at(gen, idx, 1)
        np.add.at(refcount, idx, 1)
        self._table["owner"][idx] = client_id
        np.add.at(gen, idx, 1)

    def unpin(self, ids: list[int]) -> None:
        t = self._table
        idx = np.asarray(ids)
        gen = t["generation"]
        np.add.at(gen, idx, 1)
        np.subtract.at(t["refcount"], idx, 1)
        np.add.at(gen, idx, 1)
        for b in set(ids):
            if t["refcount"][b] == 0:
                if t["state"][b] == BlockState.REGISTERED:
                    self._queue.push(b, int(t["priority"][b]))
                else:  # invalidated while pinned
                    self._release_block(b)

    def unpin_cold(self, ids: list[int], pinned_ns: int) -> None:
        """`unpin` for blocks pinned by a background copy at `pinned_ns` (monotonic): a block
        nobody used since goes back to the eviction end of its priority, not the recent end."""
        self.flush()  # last use must include the lookups not yet written
        self.unpin(ids)
        t = self._table
        for b in dict.fromkeys(reversed(ids)):  # the first of `ids` ends up first in line
            if t["refcount"][b] == 0 and t["state"][b] == BlockState.REGISTERED and t["last_use_ns"][b] <= pinned_ns:
                self._queue.to_front(b)

    # ------------------------------------------------------------ stores

    def allocate(self, hashes: list[bytes], client_id: int) -> list[int]:
        out = []
        new_ids, new_hashes, evicted = [], [], []
        for h in hashes:
            if h in self._registry:
                out.append(ALREADY_STORED)
                continue
            if h in self._pending:
                out.append(IN_FLIGHT)
                continue
            b = self._take(evicted)
            if b is None:
                out.append(NO_ROOM)
                continue
            self._pending[h] = b
            self._hash[b] = h
            out.append(b)
            new_ids.append(b)
            new_hashes.append(h)
        self._count("dedup_blocks", out.count(ALREADY_STORED))
        self._count("no_room_blocks", out.count(NO_ROOM))
        if evicted:
            self._count("evicted_blocks", len(evicted))
            self._on_event(BlockRemoved(pool_id=self.pool_id, fingerprint=self.fingerprint, hashes=evicted,
                                        tier=Tier.CPU))
        if new_ids:
            idx = np.asarray(new_ids)
            self._write(idx, state=BlockState.PARTIAL, owner=client_id, refcount=0, hits=0, checksum=0,
                        alloc_seq=self._table["alloc_seq"][idx] + 1,
                        hash=np.frombuffer(b"".join(new_hashes), "V16"))
        return out

    def commit(self, ids: list[int], checksums: list[int], priority: int) -> int:
        stored_ids, stored_hashes, dup = [], [], []
        for b in ids:
            h = self._hash[b]
            del self._pending[h]
            if h in self._registry:
                dup.append(b)
                continue
            stored_ids.append(b)
            stored_hashes.append(h)  # distinct: pending blocks have distinct hashes
        if stored_ids:
            keep = {b: c for b, c in zip(ids, checksums)}
            idx = np.asarray(stored_ids)
            self._write(idx, state=BlockState.REGISTERED, refcount=0, priority=priority,
                        checksum=np.asarray([keep[b] for b in stored_ids], np.uint64),
                        last_use_ns=time.monotonic_ns(), tier=Tier.CPU)
            self._register(stored_hashes, stored_ids)
            for b in stored_ids:
                self._queue.push(b, priority)
            self._count("stored_blocks", len(stored_ids))
            self._on_event(BlockStored(pool_id=self.pool_id, fingerprint=self.fingerprint, hashes=stored_hashes,
                                       tier=Tier.CPU))
        for b in dup:
            self._count("dedup_blocks", 1)
            self._release_block(b)
        return len(stored_ids)

    def free(self, ids: list[int]) -> None:
        for b in ids:
            del self._pending[self._hash[b]]
            self._release_block(b)
        self._count("freed_blocks", len(ids))

    def invalidate(self, ids: list[int]) -> int:
        removed = []
        for b in set(ids):
            h = self._hash[b]
            if self._table["state"][b] != BlockState.REGISTERED or self._registry.get(h) != b:
                continue
            self._unregister(h)
            removed.append(h)
            if self._table["refcount"][b] == 0:
                self._queue.remove(b)
                self._release_block(b)
            else:
                self._write([b], state=BlockState.RESET)
        if removed:
            self._count("invalidated_blocks", len(removed))
            self._on_event(BlockRemoved(pool_id=self.pool_id, fingerprint=self.fingerprint, hashes=removed,
                                        tier=Tier.CPU))
        return len(removed)

    def touch(self, hashes: list[bytes], priority: int | None) -> int:
        ids = [b for b in map(self._registry.get, hashes) if b is not None]
        if not ids:
            return 0
        if priority is not None:
            for b in ids:
                if self._queue.remove(b):
                    self._queue.push(b, priority)
            self._write(np.asarray(ids), priority=priority)
        self._write(np.asarray(ids), last_use_ns=time.monotonic_ns())
        self._queue.touch(ids)
        return len(ids)

    def set_tier(self, ids: Iterable[int], tier: int) -> None:
        self._write(list(ids), tier=tier)

    def allocate_staging(self, hashes: list[bytes]) -> list[int]:
        """`allocate` for a tier staging blocks into G2: owned by no client."""
        return self.allocate(hashes, 0)

    def register_staged(self, ids: list[int], checksums: list[int], priorities: list[int], tier: int) -> None:
        """Register staged blocks whose bytes arrived and verified, each with its G2 checksum and
        priority, and mark them as also held by `tier`."""
        by_priority: dict[int, list[int]] = {}
        for i, prio in enumerate(priorities):
            by_priority.setdefault(prio, []).append(i)
        for prio, positions in by_priority.items():
            self.commit([ids[i] for i in positions], [checksums[i] for i in positions], prio)
        self.set_tier(ids, tier)

    # ------------------------------------------------------------ internals

    def _register(self, hashes: list[bytes], ids: list[int]) -> None:
        """The one place the registry gains hashes (their records already say Registered); the
        hash index gains them too, so clients' probes find them from now on."""
        self._registry.update(zip(hashes, ids))
        self._index.insert(hashes, ids)

    def _unregister(self, h: bytes) -> None:
        """The one place the registry loses a hash; it leaves the hash index too, before its block
        can change."""
        self._index.remove([h], [self._registry.pop(h)])

    def _take(self, evicted: list[bytes]) -> int | None:
        """A free block, or the queued block to evict (its hash is appended to `evicted`)."""
        if self._free:
            return self._free.pop()
        b = self._queue.pop()
        if b < 0:
            return None
        h = self._hash[b]
        self._unregister(h)
        evicted.append(h)
        return b

    def _release_block(self, b: int) -> None:
        self._hash[b] = None
        self._write([b], state=BlockState.RESET, refcount=0, owner=0, checksum=0)
        self._free.append(b)

    def _write(self, ids, **fields) -> None:
        """Seqlock-bracketed update of block records (the coordinator is the only writer)."""
        idx = np.asarray(ids, np.int64)
        if not len(idx):
            return
        t = self._table
        t["generation"][idx] += 1
        for name, value in fields.items():
            t[name][idx] = value
        t["generation"][idx] += 1

    def _count(self, name: str, n: int) -> None:
        self.segment.counters[_COUNTER[name]] += n
