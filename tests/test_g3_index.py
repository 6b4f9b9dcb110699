"""The G3 file format and the coordinator's index of one file, against real files: slots are
handed out and evicted in the documented order, and `recover` rebuilds exactly what the slot
headers vouch for (torn, foreign, truncated and duplicate slots included)."""

import mmap
import os

import numpy as np
import pytest

from kvbm_shm.disk import format as g3
from kvbm_shm.disk.admission import AdmissionFilter
from kvbm_shm.disk.index import G3Index, SlotState
from kvbm_shm.errors import CorruptionError

FP = "ab" * 16
BLOCK = 5000  # not a multiple of 4 KiB: slots pad it


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


@pytest.fixture
def block_file(tmp_path):
    made = []

    def make(num_slots=4, fingerprint=FP):
        f, allocated = g3.BlockFile.create(tmp_path / g3.file_name(fingerprint), fingerprint=fingerprint,
                                           namespace=b"ns", block_bytes=BLOCK, num_slots=num_slots)
        assert allocated
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def write_slot(f: g3.BlockFile, slot: int, hash_: bytes, generation: int, fill: int, fingerprint=FP, priority=0):
    """What an I/O worker writes: header page + padded block, in one pwritev."""
    page = mmap.mmap(-1, g3.SLOT_HEADER_BYTES)
    data = np.full(g3.round_up(BLOCK), fill, np.uint8)
    g3.pack_slot_header(g3.slot_headers(page, 1)[0], fingerprint=fingerprint, hash=hash_, generation=generation,
                        length=BLOCK, checksum=g3.block_checksum(data[:BLOCK]), g2_checksum=fill, priority=priority)
    assert os.pwritev(f.fd, [page, data], g3.slot_offset(slot, f.slot_bytes)) == f.slot_bytes


def test_geometry_is_4k_aligned(block_file):
    f = block_file(num_slots=3)
    assert f.slot_bytes == 4096 + 8192
    assert all(g3.slot_offset(i, f.slot_bytes) % 4096 == 0 for i in range(3))
    assert os.fstat(f.fd).st_size == g3.file_bytes(3, BLOCK) == 4096 + 3 * f.slot_bytes
    assert g3.slots_for(g3.file_bytes(3, BLOCK) + 4095, BLOCK) == 3
    assert g3.parse_file_name(g3.file_name(FP)) == (g3.FORMAT_VERSION, FP)
    assert g3.parse_file_name("g3-v2-" + FP + ".blocks") == (2, FP)
    assert g3.parse_file_name("notes.txt") is None


def test_file_header_roundtrip_and_corruption(block_file):
    f = block_file(num_slots=3)
    reopened = g3.BlockFile.open(f.path)
    assert (reopened.fingerprint, reopened.block_bytes, reopened.num_slots, reopened.namespace) == (FP, BLOCK, 3, b"ns")
    reopened.close()
    with open(f.path, "r+b") as raw:
        raw.seek(40)
        byte = raw.read(1)
        raw.seek(40)
        raw.write(bytes([byte[0] ^ 1]))
    with pytest.raises(CorruptionError, match="checksum"):
        g3.BlockFile.open(f.path)


def test_slot_header_checks():
    page = mmap.mmap(-1, g3.SLOT_HEADER_BYTES)
    rec = g3.slot_headers(page, 1)[0]
    assert g3.check_slot_header(rec, FP, BLOCK) == "no slot header"
    g3.pack_slot_header(rec, fingerprint=FP, hash=h(1), generation=3, length=BLOCK, checksum=9, g2_checksum=8,
                        priority=0)
    assert g3.check_slot_header(rec, FP, BLOCK) is None
    assert g3.check_slot_header(rec, "cd" * 16, BLOCK) == "slot belongs to another namespace"
    assert "bytes" in g3.check_slot_header(rec, FP, BLOCK + 1)
    page[30] ^= 0xFF  # inside the hash
    assert g3.check_slot_header(rec, FP, BLOCK) == "slot header checksum mismatch"


def test_reserve_takes_free_slots_then_evicts_lowest_priority_then_lru(block_file):
    index = G3Index(block_file(num_slots=3))
    evicted = []
    for i, prio in ((1, 5), (2, 0), (3, 0)):
        slot, gen = index.reserve(h(i), prio, evicted)
        index.write_done(slot, ok=True, checksum=i)
    assert [index.lookup(h(i)) for i in (1, 2, 3)] == [0, 1, 2]  # low slots first
    index.begin_read(1)  # h2 is being staged: not evictable
    slot, _ = index.reserve(h(4), 0, evicted)
    assert (slot, evicted) == (2, [h(3)])
    index.read_done(1, ok=True)  # now h2 is the most recently used
    index.write_done(slot, ok=True, checksum=4)
    slot, _ = index.reserve(h(5), 0, evicted)
    assert (slot, evicted) == (1, [h(3), h(2)])  # h4 was written after h2 was read: h2 is older
    index.write_done(slot, ok=False)
    assert index.state[1] == SlotState.FREE and index.lookup(h(5)) is None
    assert index.lookup(h(1)) == 0  # the high-priority block outlived them all
    assert index.counters["evicted_blocks"] == 2


def test_busy_slots_are_never_handed_out_and_full_disk_retires(block_file):
    index = G3Index(block_file(num_slots=2))
    evicted = []
    a, _ = index.reserve(h(1), 0, evicted)
    b, _ = index.reserve(h(2), 0, evicted)
    assert index.reserve(h(3), 0, evicted) is None  # both being written
    index.write_done(a, ok=False, retire=True)  # ENOSPC: the disk has no room for that slot
    index.write_done(b, ok=True, checksum=2)
    slot, _ = index.reserve(h(3), 0, evicted)
    assert slot == b and evicted == [h(2)]  # the retired slot is not used again
    assert index.state[a] == SlotState.RETIRED


def test_bad_read_drops_the_block(block_file):
    index = G3Index(block_file(num_slots=2))
    slot, _ = index.reserve(h(1), 0, [])
    index.write_done(slot, ok=True, checksum=1)
    index.begin_read(slot)
    index.read_done(slot, ok=False)
    assert index.lookup(h(1)) is None and index.num_free == 2


def test_recover_trusts_only_verified_headers(block_file):
    f = block_file(num_slots=6)
    write_slot(f, 0, h(1), generation=1, fill=1)
    write_slot(f, 1, h(2), generation=2, fill=2, priority=3)
    write_slot(f, 2, h(1), generation=5, fill=7)  # a newer copy of h1: wins
    write_slot(f, 3, h(4), generation=4, fill=4, fingerprint="cd" * 16)  # another namespace
    write_slot(f, 4, h(5), generation=6, fill=5)
    with open(f.path, "r+b") as raw:  # a flipped bit in slot 4's header
        raw.seek(g3.slot_offset(4, f.slot_bytes) + 50)
        raw.write(b"\xff")
    index = G3Index(f)
    assert index.recover() == 2
    assert index.entries == {h(1): 2, h(2): 1}
    assert int(index.checksum[2]) == g3.block_checksum(np.full(BLOCK, 7, np.uint8))
    assert int(index.g2_checksum[2]) == 7
    assert int(index.priority[1]) == 3
    assert index.counters["dropped_at_recovery"] == 2  # foreign + torn (slot 5 was never written)
    assert index.next_generation == 7
    assert sorted(index._free) == [0, 3, 4, 5]


def test_recover_a_truncated_file_re_extends_it(block_file):
    f = block_file(num_slots=4)
    for i in range(4):
        write_slot(f, i, h(i), generation=i + 1, fill=i)
    os.truncate(f.path, g3.slot_offset(2, f.slot_bytes) + 100)  # slot 2's header is cut
    index = G3Index(f)
    assert index.recover() == 2
    assert set(index.entries) == {h(0), h(1)}
    assert index.counters["truncated_slots"] == 2
    assert os.path.getsize(f.path) == g3.file_bytes(4, BLOCK)


def test_resize_keeps_the_header_valid(block_file):
    f = block_file(num_slots=2)
    assert f.resize(5)
    assert os.path.getsize(f.path) == g3.file_bytes(5, BLOCK)
    f.resize(1)
    again = g3.BlockFile.open(f.path)
    assert again.num_slots == 1 and os.path.getsize(f.path) == g3.file_bytes(1, BLOCK)
    again.close()


def test_admission_filter_counts_uses_with_decay():
    f = AdmissionFilter(min_uses=2, decay_s=10.0)
    f.offered([h(1), h(2)])
    assert not f.admit(0, 7, h(1), hits=0)  # stored once, never reused
    assert f.admit(0, 8, h(2), hits=1)  # stored once, hit once
    assert f.admit(0, 8, h(2), hits=1)  # the same hit is not counted twice
    assert f.count(h(2)) == 2
    f.offered([h(1)])  # stored again (after an eviction): the second use
    assert f.admit(0, 7, h(1), hits=0)
    f.offered([h(2)] * 3)  # 2 -> 16
    f.decay(now=f._next_decay)  # one step: every count drops by one, ones are forgotten
    assert (f.count(h(1)), f.count(h(2))) == (1, 15)
    assert not f.admit(0, 7, h(1), hits=0)  # decayed below the threshold: must earn its place again
    assert AdmissionFilter(min_uses=1).admit(0, 1, h(9), hits=0) is False  # never offered at all
    one = AdmissionFilter(min_uses=1)
    one.offered([h(9)])
    assert one.admit(0, 1, h(9), hits=0)


def test_admission_filter_stays_bounded():
    f = AdmissionFilter(min_uses=2, max_entries=100)
    f.offered([h(i) for i in range(1000)])
    assert len(f) <= 100
