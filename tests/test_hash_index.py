"""The shared hash index: exact contents after inserts and removals (C and Python paths write the
same bytes), answers verified against block records, a writer process churning it while a
reader probes (a reader never gets a block whose record does not hold the probed hash), and,
through a real coordinator, lookups answered without a round trip whose use still reaches the
coordinator's counters and eviction order."""

from __future__ import annotations

import os
import random
import signal
import struct
import time
import uuid

import numpy as np
import pytest

from kvbm_shm import hash_index
from kvbm_shm.errors import KvbmError
from kvbm_shm.client import USAGE_REPORT_S
from kvbm_shm.hash_index import EMPTY, HashIndex, region_bytes, slots_for
from kvbm_shm.shm import RECORD_DTYPE, BlockState, PoolSegment, Segment, unlink

from . import engine
from .procs import start_child, wait_for


@pytest.fixture(params=["c", "python"])
def path(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(hash_index, "_c", None)
    elif hash_index._c is None:
        pytest.skip("kvbm_shm._hashing is not built")
    return request.param


def make(num_blocks: int, slots: int | None = None) -> HashIndex:
    slots = slots or slots_for(num_blocks)
    region = np.zeros(region_bytes(slots), np.uint8)
    HashIndex.format(region, slots)
    return HashIndex(region, np.zeros(num_blocks, RECORD_DTYPE), BlockState.REGISTERED)


def register(index: HashIndex, block: int, h: bytes) -> None:
    """What the coordinator does: the record first, then the index entry."""
    t = index.table
    t["generation"][block] += 1
    t["hash"][block] = np.void(h)
    t["state"][block] = BlockState.REGISTERED
    t["generation"][block] += 1
    index.insert([h], [block])


def h_at(home: int, tag: int) -> bytes:
    """A hash whose home slot (for a table of up to 2**16 slots) is `home`."""
    return struct.pack("<QQ", home | tag << 16, tag)


def test_sizes():
    assert [slots_for(n) for n in (1, 2, 3, 4, 5, 1000)] == [2, 4, 8, 8, 16, 2048]
    assert region_bytes(8) == 64 + 8 * 32


def test_insert_probe_remove(path):
    index = make(8)
    hs = [h_at(i, i) for i in range(4)]
    for b, h in enumerate(hs):
        register(index, b, h)
    assert len(index) == 4
    assert index.probe(hs) == [0, 1, 2, 3]
    assert index.probe([hs[2], hs[0]]) == [2, 0]
    assert index.probe([hs[0], h_at(9, 9), hs[1]]) == [0]  # the prefix ends at the first miss
    assert index.remove([hs[1]], [3]) == 0  # names another block: stays
    assert index.remove([hs[1]], [1]) == 1
    assert index.remove([hs[1]], [1]) == 0
    assert len(index) == 3 and index.probe(hs) == [0]
    assert index.probe([hs[3]]) == [3]


def test_probe_vouches_only_for_registered_records(path):
    index = make(4)
    a, b = h_at(1, 1), h_at(2, 2)
    register(index, 0, a)
    register(index, 1, b)
    index.table["state"][1] = BlockState.PARTIAL  # rewritten: the index entry is stale
    assert index.probe([a, b]) == [0]
    index.table["state"][1] = BlockState.REGISTERED
    index.table["hash"][1] = np.void(h_at(3, 3))  # reused for another hash
    assert index.probe([a, b]) == [0]
    index.insert([a], [1])  # an entry that lies about where `a` is
    assert index.probe([a]) == []
    index.table["generation"][0] += 1  # record 0 mid-update (odd): not vouched for
    index.insert([a], [0])
    assert index.probe([a]) == []
    index.table["generation"][0] += 1
    assert index.probe([a]) == [0]
    index.insert([a], [7])  # a block id past the pool
    assert index.probe([a]) == []


def test_collisions_and_backward_shift(path):
    index = make(8, slots=8)
    # a run that wraps around the end of the table: homes 6, 6, 7, 7, 6 -> slots 6, 7, 0, 1, 2
    hs = [h_at(6, 1), h_at(6, 2), h_at(7, 3), h_at(7, 4), h_at(6, 5)]
    for b, h in enumerate(hs):
        register(index, b, h)
    assert [int(x) for x in index.entries["block"]] == [2, 3, 4, EMPTY, EMPTY, EMPTY, 0, 1]
    index.remove([hs[0]], [0])  # every later entry of the run moves back one slot
    assert [int(x) for x in index.entries["block"]] == [3, 4, EMPTY, EMPTY, EMPTY, EMPTY, 1, 2]
    assert index.probe(hs[1:]) == [1, 2, 3, 4]
    index.remove([hs[2]], [2])  # home 7 at slot 7: slot 0 (home 7) moves up, slot 1 (home 6) too
    assert [int(x) for x in index.entries["block"]] == [4, EMPTY, EMPTY, EMPTY, EMPTY, EMPTY, 1, 3]
    assert index.probe([hs[1], hs[3], hs[4]]) == [1, 3, 4]
    assert np.all(index.entries["seq"] % 2 == 0)


def test_c_and_python_write_the_same_table(monkeypatch):
    if hash_index._c is None:
        pytest.skip("kvbm_shm._hashing is not built")
    rng = random.Random(7)
    num_blocks = 64
    indexes = {"c": make(num_blocks), "python": make(num_blocks)}
    model: dict[bytes, int] = {}
    free = list(range(num_blocks))
    for step in range(3000):
        if free and (not model or rng.random() < 0.55):
            h = h_at(rng.randrange(16), step)  # few homes: long runs that wrap and shift
            b = free.pop(rng.randrange(len(free)))
            model[h] = b
            op = ("insert", [h], [b])
        else:
            h = rng.choice(list(model))
            b = model.pop(h)
            free.append(b)
            op = ("remove", [h], [b])
        for name, index in indexes.items():
            if name == "python":
                monkeypatch.setattr(hash_index, "_c", None)
            assert getattr(index, op[0])(op[1], op[2]) == 1
            monkeypatch.undo()
        if step % 100 == 0:
            assert bytes(indexes["c"].entries) == bytes(indexes["python"].entries)
    assert bytes(indexes["c"].entries) == bytes(indexes["python"].entries)
    for name, index in indexes.items():
        assert len(index) == len(model)
        assert int(index.header["epoch"]) % 2 == 0
        for h, b in model.items():  # every live entry is where a probe finds it
            assert index._find(h) is not None and int(index.entries["block"][index._find(h)]) == b
        stored = {bytes(x["hash"]): int(x["block"]) for x in index.entries if x["block"] != EMPTY}
        assert stored == model


def test_answer_says_when_only_the_coordinator_can_answer(path):
    index = make(8)
    hs = [h_at(i, i) for i in range(3)]
    for b, h in enumerate(hs[:2]):
        register(index, b, h)
    assert index.answer(hs[:2]) == [0, 1]  # the whole request: answered here
    assert index.answer(hs) == [0, 1]  # ends early, and no tier below G2 could hold the rest
    index.lower_tiers = True
    assert index.answer(hs) is None and index.answer(hs[:2]) == [0, 1]
    index.lower_tiers = False
    index.table["generation"][1] += 1  # record 1 mid-update, and its writer never finishes
    assert index.probe(hs) == [0]
    assert index.answer(hs) is None  # not a miss: not known
    index.table["generation"][1] += 1
    odd = index._find(hs[0])
    index.entries["seq"][odd] += 1  # a slot mid-update
    assert index.probe(hs) == [] and index.answer(hs) is None
    index.entries["seq"][odd] += 1
    assert index.answer(hs) == [0, 1]
    index.close()
    assert index.answer(hs) is None and index.probe(hs) == []


def test_clear_and_read_only(path):
    index = make(4)
    register(index, 0, h_at(0, 1))
    seq_before = index.entries["seq"].copy()
    index.clear()
    assert len(index) == 0 and index.probe([h_at(0, 1)]) == []
    assert np.all(index.entries["block"] == EMPTY)
    assert np.all(index.entries["seq"] > seq_before) and np.all(index.entries["seq"] % 2 == 0)
    region = np.zeros(region_bytes(8), np.uint8)
    HashIndex.format(region, 8)
    region.flags.writeable = False
    reader = HashIndex(region, index.table, BlockState.REGISTERED)
    assert reader.probe([h_at(0, 1)]) == []
    with pytest.raises(ValueError, match="read-only"):
        reader.insert([h_at(0, 1)], [0])
    index.lower_tiers = True
    assert index.lower_tiers and int(index.header["lower_tiers"]) == 1
    register(index, 1, h_at(1, 1))
    assert not index.closed and index.probe([h_at(1, 1)]) == [1]
    index.close()
    assert index.closed and len(index) == 0 and index.probe([h_at(1, 1)]) == []


# ---------------------------------------------------------------- a writer racing readers

RACE_BLOCKS = 64


def race_hash(block: int, version: int) -> bytes:
    """Hashes name the block they are registered at, so a reader can check an answer exactly.
    Their homes fall in 8 of 128 slots: long runs, shifted on every removal."""
    return struct.pack("<QII", (version * 2654435761 + block) % 8, block, version)


def _race_region(seg: Segment) -> np.ndarray:
    return seg.view(np.uint8, RACE_BLOCKS * RECORD_DTYPE.itemsize, region_bytes(slots_for(RACE_BLOCKS)))


def _race_index(seg: Segment) -> HashIndex:
    return HashIndex(_race_region(seg), seg.view(RECORD_DTYPE, 0, RACE_BLOCKS), BlockState.REGISTERED)


def race_writer(name: str, seconds: float) -> int:
    """Churn: blocks are removed, re-registered under a new hash, and sometimes an index entry is
    pointed at the wrong block (a stale entry) before being put right. Returns operations done."""
    seg = Segment.attach(name)
    index = _race_index(seg)
    t = index.table
    rng = random.Random(1)
    version = [0] * RACE_BLOCKS
    ops = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        b = rng.randrange(RACE_BLOCKS)
        index.remove([race_hash(b, version[b])], [b])  # the order of BlockPool: index, then record
        t["generation"][b] += 1
        t["state"][b] = BlockState.RESET
        t["generation"][b] += 1
        version[b] += 1
        register(index, b, race_hash(b, version[b]))
        if rng.random() < 0.2:  # a lie: another block's current hash mapped to b for a moment
            other = rng.randrange(RACE_BLOCKS)
            if other != b:
                lie = race_hash(other, version[other])
                index.insert([lie], [b])
                time.sleep(0.0005)
                index.insert([lie], [other])
        ops += 1
    del index, t
    seg.close()
    return ops


@pytest.mark.timeout(60)
def test_racing_writer_never_makes_a_reader_serve_another_block(path):
    name = f"kvbm-t{uuid.uuid4().hex[:10]}-race"
    seg = Segment.create(name, RACE_BLOCKS * RECORD_DTYPE.itemsize + region_bytes(slots_for(RACE_BLOCKS)))
    reader_seg = None
    try:
        HashIndex.format(_race_region(seg), slots_for(RACE_BLOCKS))
        index = _race_index(seg)
        for b in range(RACE_BLOCKS):
            register(index, b, race_hash(b, 0))
        del index
        reader_seg = Segment.attach(name, writable=False)
        reader = _race_index(reader_seg)
        writer = start_child(race_writer, name, 2.0, timeout_s=30)
        hits = misses = probes = 0
        rng = random.Random(2)
        try:
            while writer.process.is_alive() or probes == 0:
                # probe what the table held a moment ago: some of it is gone or moved by now
                recs = reader.table.copy()
                asked = [bytes(recs["hash"][b]) for b in rng.sample(range(RACE_BLOCKS), 16)]
                got = reader.probe(asked)
                for h, b in zip(asked, got):
                    assert struct.unpack("<QII", h)[1] == b, f"probe of a hash of block {h[8:12]} returned block {b}"
                hits += len(got)
                misses += len(got) < len(asked)
                probes += 1
        finally:
            ops = writer.result()
        del reader
        assert ops > 500 and probes > 100, (ops, probes)
        assert hits > 2 * probes, (hits, probes)  # mostly found: the churn does not hide the index
        assert misses > 0  # the race happened
    finally:
        seg.close()
        if reader_seg is not None:
            reader_seg.close()
        unlink(name)


# ---------------------------------------------------------------- wired into the service


def _lookups(client, pool) -> dict[str, int]:
    c = client.stats().pools[0].counters
    return {k: c[k] for k in ("lookups", "lookup_blocks", "hit_blocks")}


@pytest.mark.timeout(60)
def test_local_lookups_are_reported_and_keep_hot_blocks(coordinator, instance, runtime_dir):
    kv = engine.make_kv(3)
    ns = engine.namespace(kv)
    hashes = engine.prompt_hashes(6)
    with (engine.connect(instance, runtime_dir, "reader") as reader,
          engine.connect(instance, runtime_dir, "writer") as writer):
        pool = reader.register_layout(ns, cache_bytes=PoolSegment.size_for(4, ns.kv.block_bytes))
        assert pool.num_blocks == 4 and not pool.segment.index.lower_tiers
        assert reader.store(pool.bind(kv), hashes[:4], [0, 1, 2, 3]).stored == 4  # least recent first: 0, 1, 2, 3
        before = _lookups(reader, pool)
        os.kill(coordinator.proc.pid, signal.SIGSTOP)  # answered from the index: no round trip
        try:
            for _ in range(5):
                assert reader.lookup(pool, hashes[:2] + hashes[4:5]) == [0, 1]
        finally:
            os.kill(coordinator.proc.pid, signal.SIGCONT)
        want = {"lookups": before["lookups"] + 5, "lookup_blocks": before["lookup_blocks"] + 15,
                "hit_blocks": before["hit_blocks"] + 10}
        wait_for(lambda: _lookups(reader, pool) == want, timeout_s=10 * USAGE_REPORT_S + 5, what="usage report")
        # another client's store evicts the least recently used: blocks 2 and 3, not the hot 0 and 1
        wpool = writer.register_layout(ns)
        assert writer.store(wpool.bind(kv), hashes[4:6], [0, 1]).stored == 2
        assert reader.lookup(pool, hashes[:2]) == [0, 1]
        assert reader.lookup(pool, hashes[2:3]) == [] and reader.lookup(pool, hashes[3:4]) == []
        # the reader's own lookups reach the coordinator before its next store, however soon
        assert reader.lookup(pool, hashes[4:5]) == [wpool.segment.index.probe(hashes[4:5])[0]]
        assert reader.store(pool.bind(kv), hashes[2:3], [2]).stored == 1  # evicts the LRU one: hashes[5]
        assert reader.lookup(pool, hashes[4:5]) != [] and reader.lookup(pool, hashes[5:6]) == []
        assert reader.lookup(pool, hashes[:2]) == [0, 1]


@pytest.mark.timeout(60)
def test_lookup_with_pins_or_after_a_clean_stop_asks_the_coordinator(coordinator_factory, instance, runtime_dir):
    first = coordinator_factory()
    kv = engine.make_kv(4)
    client = engine.connect(instance, runtime_dir, timeout_s=1.0)
    pool = client.register_layout(engine.namespace(kv))
    hashes = engine.prompt_hashes(2)
    assert client.store(pool.bind(kv), hashes, [0, 1]).stored == 2
    pinned = client.lookup(pool, hashes, pin=True)
    assert client.stats().pools[0].pinned == 2
    client.release(pool, pinned)
    first.stop()
    assert pool.segment.index.closed  # the pool is gone: a lookup must not be answered from it
    with pytest.raises(KvbmError):
        client.lookup(pool, hashes)
    coordinator_factory()
    assert client.lookup(pool, hashes) == []
    client.close()
