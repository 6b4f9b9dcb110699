"""The block state machine of one pool, against exact state in the shm block table."""

import time
import uuid

import numpy as np
import pytest

from kvbm_shm import protocol as p
from kvbm_shm.control.pool import BlockPool
from kvbm_shm.hash_index import EMPTY
from kvbm_shm.shm import BlockState, PoolSegment, unlink


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


@pytest.fixture
def make_pool():
    made = []

    def make(num_blocks=4):
        name = f"kvbm-t{uuid.uuid4().hex[:8]}-pool-0"
        seg = PoolSegment.create(name, pool_id=0, num_blocks=num_blocks, block_bytes=4096, instance="t",
                                 segment_id=uuid.uuid4().hex, fingerprint="f" * 32, namespace=b"")
        events = []
        pool = BlockPool(0, seg, "m", events.append)
        made.append(seg)
        return pool, events

    yield make
    for seg in made:
        name = seg.name
        seg.close()
        unlink(name)


def store(pool, hashes, client=1, prio=0):
    ids = pool.allocate(hashes, client)
    pool.commit([b for b in ids if b >= 0], [7] * sum(b >= 0 for b in ids), prio)
    return ids


def test_lifecycle_and_table(make_pool):
    pool, events = make_pool()
    ids = pool.allocate([h(1), h(2)], client_id=5)
    t = pool.segment.table
    assert [t["state"][b] for b in ids] == [BlockState.PARTIAL] * 2
    assert [int(t["owner"][b]) for b in ids] == [5, 5]
    assert pool.lookup([h(1)]) == []  # partial blocks are not matchable
    pool.commit(ids, [11, 22], priority=0)
    assert [t["state"][b] for b in ids] == [BlockState.REGISTERED] * 2
    assert [int(t["checksum"][b]) for b in ids] == [11, 22]
    assert bytes(t["hash"][ids[1]]) == h(2)
    assert pool.lookup([h(1), h(2), h(3)]) == ids
    assert pool.lookup([h(2), h(1)]) == [ids[1], ids[0]]
    assert pool.lookup([h(3), h(1)]) == []  # a prefix ends at the first miss
    assert isinstance(events[0], p.BlockStored) and events[0].hashes == [h(1), h(2)]
    assert np.all(t["generation"] % 2 == 0)
    records = pool.segment.read_records(ids)
    assert records["state"].tolist() == [BlockState.REGISTERED] * 2


def test_dedup_and_in_flight(make_pool):
    pool, _ = make_pool()
    first = pool.allocate([h(1)], 1)
    assert pool.allocate([h(1)], 2) == [p.IN_FLIGHT]
    pool.commit(first, [0], 0)
    assert pool.allocate([h(1), h(2)], 2)[0] == p.ALREADY_STORED
    assert pool.counters()["dedup_blocks"] == 1


def test_eviction_lowest_priority_then_lru(make_pool):
    pool, events = make_pool(num_blocks=4)
    store(pool, [h(1)], prio=5)
    store(pool, [h(2)], prio=0)
    store(pool, [h(3)], prio=0)
    store(pool, [h(4)], prio=0)
    pool.lookup([h(2)])  # h2 is now more recent than h3 and h4
    got = pool.allocate([h(10), h(11), h(12)], 1)
    assert all(b >= 0 for b in got)
    assert {hh for hh, _ in pool.registered()} == {h(1)}  # h3, h4 (LRU), then h2; the high-priority block stays
    removed = [hh for e in events if isinstance(e, p.BlockRemoved) for hh in e.hashes]
    assert removed == [h(3), h(4), h(2)]


def test_pins_survive_pressure_and_no_room(make_pool):
    pool, _ = make_pool(num_blocks=2)
    ids = store(pool, [h(1), h(2)])
    pool.pin(ids, 9)
    assert pool.allocate([h(3)], 1) == [p.NO_ROOM]
    pool.unpin([ids[0]])
    assert pool.allocate([h(3)], 1) == [ids[0]]
    assert pool.lookup([h(2)]) == [ids[1]]
    assert int(pool.segment.table["refcount"][ids[1]]) == 1


def test_invalidate_pinned_block_frees_on_last_unpin(make_pool):
    pool, events = make_pool(num_blocks=2)
    ids = store(pool, [h(1)])
    pool.pin(ids, 3)
    assert pool.invalidate(ids) == 1
    assert pool.lookup([h(1)]) == []
    assert pool.stats()["free"] == 1
    pool.unpin(ids)
    assert pool.stats()["free"] == 2
    assert pool.segment.table["state"][ids[0]] == BlockState.RESET


def test_free_returns_partial_blocks(make_pool):
    pool, _ = make_pool(num_blocks=2)
    ids = pool.allocate([h(1), h(2)], 1)
    pool.free(ids)
    assert pool.stats() == {"free": 2, "partial": 0, "registered": 0, "pinned": 0, "inactive": 0}
    assert pool.allocate([h(1)], 1)[0] >= 0  # the hash is no longer in flight


def test_recover_keeps_registered_blocks_drops_the_rest(make_pool):
    pool, _ = make_pool(num_blocks=4)
    ids = store(pool, [h(1), h(2)])
    pool.pin([ids[0]], 4)
    pool.allocate([h(3)], 4)  # partial, its writer "dies" with the coordinator
    fresh = BlockPool(0, pool.segment, "m", lambda e: None)
    assert fresh.recover() == 2
    assert fresh.lookup([h(1), h(2)]) == ids
    assert fresh.stats() == {"free": 2, "partial": 0, "registered": 2, "pinned": 0, "inactive": 2}


def test_eviction_order_and_unpin_cold_for_background_copies(make_pool):
    pool, _ = make_pool(num_blocks=4)
    ids = store(pool, [h(1), h(2), h(3), h(4)])
    assert pool.eviction_order(10) == ids and pool.eviction_order(2) == ids[:2]
    pinned_ns = time.monotonic_ns()
    pool.pin(ids[:2], 0)  # a write-back copies h1 and h2
    assert pool.eviction_order(10) == ids[2:]
    pool.lookup([h(2)])  # h2 is used meanwhile
    pool.unpin_cold(ids[:2], pinned_ns)
    assert pool.eviction_order(10) == [ids[0], ids[2], ids[3], ids[1]]  # h1 back in front, h2 most recent
    pool.set_tier([ids[0]], p.Tier.DISK)
    assert int(pool.segment.table["tier"][ids[0]]) == p.Tier.DISK and pool.hash_of(ids[0]) == h(1)
    assert pool.allocate([h(9)], 1) == [ids[0]]
    assert pool.num_free == 0


def indexed(pool) -> dict[bytes, int]:
    """The pool segment's hash index, as clients see it: hash -> block of every entry."""
    e = pool.segment.index.entries
    return {bytes(x["hash"]): int(x["block"]) for x in e if x["block"] != EMPTY}


def test_hash_index_mirrors_the_registry(make_pool):
    pool, _ = make_pool(num_blocks=4)
    index = pool.segment.index
    ids = store(pool, [h(1), h(2), h(3)])
    assert indexed(pool) == dict(pool.registered()) == {h(1): ids[0], h(2): ids[1], h(3): ids[2]}
    assert index.probe([h(1), h(2), h(3), h(4)]) == ids
    store(pool, [h(1), h(4)])  # h1 deduplicated: its entry stays
    assert indexed(pool) == dict(pool.registered()) and len(index) == 4
    pool.invalidate([ids[1]])
    assert indexed(pool) == dict(pool.registered()) and index.probe([h(1), h(2)]) == [ids[0]]
    evicting = pool.allocate([h(5), h(6)], 1)  # takes the free block, then evicts the LRU (h1)
    assert h(1) not in indexed(pool) and indexed(pool) == dict(pool.registered())
    pool.free(evicting)
    hits = int(pool.hits_of([ids[2]])[0])
    assert pool.used([h(3), h(9)], [2, 1], lookups=2, lookup_blocks=5, hit_blocks=3) == 1
    c = pool.counters()
    assert (c["lookups"], c["lookup_blocks"], c["hit_blocks"]) == (2, 5, 3)
    assert int(pool.hits_of([ids[2]])[0]) == hits + 2  # each reported use is a hit of the block
    assert pool.eviction_order(1) != [ids[2]]  # reported use: h3 is no longer first in line
    index.insert([h(7)], [ids[2]])  # a stale entry a dead coordinator might leave
    fresh = BlockPool(0, pool.segment, "m", lambda e: None)
    assert fresh.recover() == 2
    assert indexed(fresh) == dict(fresh.registered()) == {h(3): ids[2], h(4): pool.block_of(h(4))}
    assert not index.lower_tiers and not index.closed
    fresh.lower_tiers = True
    assert index.lower_tiers
    fresh.close()
    seg = PoolSegment.attach(pool.segment.name)
    try:
        assert seg.index.closed and len(seg.index) == 0
    finally:
        seg.close()
