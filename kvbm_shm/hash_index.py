"""The shared hash index of a G2 pool: sequence hash -> block id, probed without a round trip.

The coordinator is its only writer; every client maps it read-only (it lies in the pool
segment before `data_offset`, beside the block table) and answers a lookup from it. An answer is
a hint: `probe` returns a block only if the block's record, read under the block table's seqlock,
is Registered under the probed hash, and a load checks that record again before and after its
copy, and the bytes against the checksum. A stale or racing index can cause a miss, never wrong
bytes.

Layout of the region (little-endian):

    header, 64 bytes: epoch u64 | count u64 | slots u64 | lower_tiers u32 | closed u32 | reserved
    slots x 32 bytes: seq u64 | hash 16 B | block u32 | pad u32      (block 0xFFFFFFFF: empty)

- Open addressing with linear probing; an entry's home slot is the little-endian value of its
  hash's first 8 bytes modulo `slots` (a power of two, at least twice the pool's blocks, so the
  table is at most half full and every run ends at an empty slot).
- Per-slot seqlock: the writer makes `seq` odd, writes the entry, makes it even again; a reader
  copies an entry only between two equal even reads of `seq`, so it never acts on a torn entry.
- Removal shifts the later entries of the run back into the hole (no tombstones: probe lengths
  stay those of a table that was never churned), bracketed by `epoch` (odd while shifting). An
  entry being shifted can be missed by a reader that crossed its new slot before the move; a
  reader that found no entry therefore probes again if `epoch` moved (a few times, then: a miss).
- `lower_tiers`: the coordinator sets it while some tier below G2 exists (disk, cluster: any tier
  that can stage blocks this pool does not hold); a client then asks the coordinator about a
  request its local hits do not cover whole.
- `closed`: set (and the index emptied) when the coordinator stops cleanly and removes the pool:
  a client that still maps it asks the coordinator instead, and so learns that the pool is gone.
  A coordinator that dies leaves the index as it was: its blocks stay servable, and the next
  coordinator adopts the pool and rebuilds the index.

Writer: `HashIndex.format(region, slots)`, `insert(hashes, ids)`, `remove(hashes, ids)` (an
entry is removed only if it names that block), `clear()`, `close()`. Reader: `probe(hashes)` -> block
ids of the longest verified prefix; `answer(hashes)` -> that prefix when it is a lookup's whole
answer, else None (ask the coordinator). Each runs in `kvbm_shm._hashing` (C) when it is built, else in the
Python below, which computes the same table and the same answers.
"""

from __future__ import annotations

import os

import numpy as np

try:
    from . import _hashing as _c
except ImportError:  # built without a C compiler: the same index, maintained and probed in Python
    _c = None

HEADER_DTYPE = np.dtype([("epoch", "<u8"), ("count", "<u8"), ("slots", "<u8"), ("lower_tiers", "<u4"),
                         ("closed", "<u4"), ("reserved", "V32")])
SLOT_DTYPE = np.dtype([("seq", "<u8"), ("hash", "V16"), ("block", "<u4"), ("pad", "<u4")])
assert HEADER_DTYPE.itemsize == 64 and SLOT_DTYPE.itemsize == 32
assert _c is None or (_c.INDEX_HEADER_BYTES, _c.SLOT_BYTES) == (HEADER_DTYPE.itemsize, SLOT_DTYPE.itemsize)
EMPTY = 0xFFFFFFFF
_SEQLOCK_TRIES = 1000
_SEQLOCK_SPINS = 64  # then each try yields: a writer preempted mid-update gets to finish
_PROBE_ATTEMPTS = 8
_STALLED = -2  # a probe that could not read a slot or record consistently
_ZERO_HASH = bytes(16)


def slots_for(num_blocks: int) -> int:
    """Slots of the index of a pool of `num_blocks`: the power of two >= 2 x num_blocks."""
    return 1 << max(1, (2 * num_blocks - 1).bit_length())


def region_bytes(slots: int) -> int:
    return HEADER_DTYPE.itemsize + slots * SLOT_DTYPE.itemsize


class HashIndex:
    """The index in `region` (uint8 view of its bytes: writable for the coordinator, read-only for
    clients), checked against `table` (the pool's block records) with `registered` as the state
    that makes a block matchable."""

    def __init__(self, region: np.ndarray, table: np.ndarray, registered: int):
        self.header = region[:HEADER_DTYPE.itemsize].view(HEADER_DTYPE)[0]
        self.slots = int(self.header["slots"])
        if self.slots < 2 or self.slots & (self.slots - 1) or region_bytes(self.slots) > len(region):
            raise ValueError(f"hash index of {self.slots} slots does not fit its {len(region)}-byte region")
        self.entries = region[HEADER_DTYPE.itemsize:region_bytes(self.slots)].view(SLOT_DTYPE)
        self.address = region.ctypes.data
        self.table = table
        self.registered = int(registered)
        fields = table.dtype.fields
        ids: list[int | None] = [None] * len(table)  # the C probe's ints of the blocks it returned
        self._probe_args = (self.address, self.slots, table.ctypes.data, ids, table.dtype.itemsize,
                            fields["generation"][1], fields["hash"][1], fields["state"][1], self.registered)
        self._mask = self.slots - 1

    @staticmethod
    def format(region: np.ndarray, slots: int) -> None:
        """Write an empty index of `slots` slots into a fresh region (zeroed memory)."""
        header = region[:HEADER_DTYPE.itemsize].view(HEADER_DTYPE)[0]
        header["slots"] = slots
        region[HEADER_DTYPE.itemsize:region_bytes(slots)].view(SLOT_DTYPE)["block"] = EMPTY

    def __len__(self) -> int:
        return int(self.header["count"])

    @property
    def lower_tiers(self) -> bool:
        return bool(self.header["lower_tiers"])

    @lower_tiers.setter
    def lower_tiers(self, value: bool) -> None:
        self.header["lower_tiers"] = int(value)

    @property
    def closed(self) -> bool:
        return bool(self.header["closed"])

    # ------------------------------------------------------------ writer (the coordinator)

    def insert(self, hashes: list[bytes], ids: list[int]) -> int:
        """Index `hashes[i] -> ids[i]` (replacing the block of a hash already indexed); entries added."""
        self._check_writable()
        if _c is not None:
            return _c.index_insert(self.address, self.slots, hashes, ids)
        added = 0
        for h, b in zip(hashes, ids):
            i = self._home(h)
            for _ in range(self.slots):
                block = int(self.entries["block"][i])
                if block == EMPTY:
                    self._write(i, h, b)
                    added += 1
                    break
                if bytes(self.entries["hash"][i]) == h:
                    if block != b:
                        self._write(i, h, b)
                    break
                i = (i + 1) & self._mask
            else:
                raise OverflowError("hash index is full")
        self.header["count"] += added
        return added

    def remove(self, hashes: list[bytes], ids: list[int]) -> int:
        """Drop the entries `hashes[i] -> ids[i]` (one that names another block stays); entries removed."""
        self._check_writable()
        if _c is not None:
            return _c.index_remove(self.address, self.slots, hashes, ids)
        removed = 0
        e = self.entries
        for h, b in zip(hashes, ids):
            i = self._find(h)
            if i is None or int(e["block"][i]) != b:
                continue
            epoch = (int(self.header["epoch"]) + 1) & ~1
            self.header["epoch"] = epoch + 1
            j = i
            while True:
                j = (j + 1) & self._mask
                if int(e["block"][j]) == EMPTY:
                    break
                moved = bytes(e["hash"][j])
                k = self._home(moved)
                if (k <= i or k > j) if j > i else (k <= i and k > j):
                    self._write(i, moved, int(e["block"][j]))
                    i = j
            self._write(i, _ZERO_HASH, EMPTY)
            self.header["epoch"] = epoch + 2
            removed += 1
        self.header["count"] -= removed
        return removed

    def close(self) -> None:
        """The pool is going away: no client answers from this index any more."""
        self._check_writable()
        self.header["closed"] = 1
        self._empty()

    def clear(self) -> None:
        """Empty every slot and open the index: a coordinator adopting a pool rebuilds it from the
        table (a pool whose coordinator died while closing it is open again)."""
        self._check_writable()
        self._empty()
        self.header["closed"] = 0

    def _empty(self) -> None:
        epoch = (int(self.header["epoch"]) + 1) & ~1
        self.header["epoch"] = epoch + 1
        seq = self.entries["seq"]
        seq[:] = (seq | 1) + 1  # even, and past any value a reader may hold
        seq += 1
        self.entries["hash"] = np.void(_ZERO_HASH)
        self.entries["block"] = EMPTY
        seq += 1
        self.header["count"] = 0
        self.header["epoch"] = epoch + 2

    # ------------------------------------------------------------ reader (any client)

    def probe(self, hashes: list[bytes]) -> list[int]:
        """Block ids of the longest prefix of `hashes` whose entries name blocks that are, now,
        Registered under those hashes (records read under the table's seqlock)."""
        if _c is not None:
            return _c.index_probe(*self._probe_args, hashes, False)
        return self._probe(hashes)[0]

    def answer(self, hashes: list[bytes]) -> list[int] | None:
        """A lookup's answer from the index alone: `probe(hashes)`, or None when only the
        coordinator can answer: the index is closed, a slot or record kept changing under the
        probe (a writer preempted mid-update), or the prefix ended early and `lower_tiers` is set."""
        if _c is not None:
            return _c.index_probe(*self._probe_args, hashes, True)
        if self.closed:
            return None
        ids, settled = self._probe(hashes)
        return ids if len(ids) == len(hashes) or settled and not self.lower_tiers else None

    # ------------------------------------------------------------ the Python path

    def _check_writable(self) -> None:
        """A client's read-only mapping must never reach the C writer (it would fault, not raise)."""
        if not self.entries.flags.writeable:
            raise ValueError("this hash index is mapped read-only: only the coordinator writes it")

    def _home(self, h: bytes) -> int:
        return int.from_bytes(h[:8], "little") & self._mask

    def _find(self, h: bytes) -> int | None:
        """The slot holding `h` (writer side: entries do not change under it)."""
        i = self._home(h)
        for _ in range(self.slots):
            if int(self.entries["block"][i]) == EMPTY:
                return None
            if bytes(self.entries["hash"][i]) == h:
                return i
            i = (i + 1) & self._mask
        return None

    def _write(self, i: int, h: bytes, block: int) -> None:
        seq = self.entries["seq"]
        q = (int(seq[i]) + 1) & ~1
        seq[i] = q + 1
        self.entries["hash"][i] = np.void(h)
        self.entries["block"][i] = block
        seq[i] = q + 2

    def _read(self, i: int) -> tuple[bytes, int] | None:
        seq = self.entries["seq"]
        for t in range(_SEQLOCK_TRIES):
            a = int(seq[i])
            if a & 1:
                _seqlock_wait(t)
                continue
            h, b = bytes(self.entries["hash"][i]), int(self.entries["block"][i])
            if int(seq[i]) == a:
                return h, b
        return None

    def _probe(self, hashes: list[bytes]) -> tuple[list[int], bool]:
        """The verified prefix, and whether where it ended is known (False: something kept changing)."""
        out = []
        for h in hashes:
            b = self._probe_one(h)
            if b is None or b == _STALLED or b >= len(self.table):
                return out, b != _STALLED
            named = self._record_names(b, h)
            if not named:
                return out, named is not None
            out.append(b)
        return out, True

    def _probe_one(self, h: bytes) -> int | None:
        """The block the index names for `h`, None, or _STALLED."""
        for _ in range(_PROBE_ATTEMPTS):
            e0 = int(self.header["epoch"])
            i = self._home(h)
            for _ in range(self.slots):
                entry = self._read(i)
                if entry is None:
                    return _STALLED
                if entry[1] == EMPTY:
                    break
                if entry[0] == h:
                    return entry[1]
                i = (i + 1) & self._mask
            if not e0 & 1 and int(self.header["epoch"]) == e0:
                return None
        return _STALLED

    def _record_names(self, b: int, h: bytes) -> bool | None:
        """Whether record `b` is Registered under `h`; None if it kept changing."""
        t = self.table
        for n in range(_SEQLOCK_TRIES):
            a = int(t["generation"][b])
            if a & 1:
                _seqlock_wait(n)
                continue
            state, recorded = int(t["state"][b]), bytes(t["hash"][b])
            if int(t["generation"][b]) == a:
                return state == self.registered and recorded == h
        return None


def _seqlock_wait(tries: int) -> None:
    if tries >= _SEQLOCK_SPINS:
        os.sched_yield()
