"""One namespace's G3 file as the coordinator tracks it. Runs in the coordinator process only;
single-threaded. It never moves block bytes (the I/O workers do); it reads slot headers once, in
`recover`, to rebuild itself after a restart.

Slot states:

    FREE --reserve--> WRITING --write_done(ok)--> STORED --begin_read--> READING --read_done--> STORED
      ^                  |  (failed)                |  (evicted, dropped)                  | (bad)
      +------------------+--------------------------+--------------------------------------+
    WRITING --write_done(failed, retire)--> RETIRED: the disk had no room for that slot (a sparse
    file on a full filesystem); it is not used again until the next start.

Contract:
- `lookup(h)`: the slot holding hash `h` (STORED or READING), or None.
- `reserve(h, priority)`: a slot to write `h` into, with the generation to stamp on it, or None
  when every slot is busy. Takes a free slot, else evicts the STORED slot of lowest priority,
  least recently used (`kvbm_shm.eviction`: bounded priority classes, O(1)); evicted hashes are
  appended to `evicted` for the caller to report.
- `begin_read(slot)` / `read_done(slot, ok)`: a slot being staged into G2 cannot be evicted;
  a good read makes it the most recently used, a bad one drops it.
- `drop(slot)`: forget a STORED slot (its bytes failed verification).
- `recover()`: rebuild from the slot headers. A header that does not verify, or belongs to
  another namespace or format, leaves its slot free; when a hash appears twice, the higher
  generation wins. Bytes are verified when read, never trusted from the scan alone.
"""

from __future__ import annotations

import collections
import enum
import logging

import numpy as np

from ..eviction import EvictionQueue
from . import format as g3

log = logging.getLogger(__name__)

_SCAN_CHUNK = 1024


class SlotState(enum.IntEnum):
    FREE = 0
    WRITING = 1
    STORED = 2
    READING = 3
    RETIRED = 4


class G3Index:
    def __init__(self, file: g3.BlockFile):
        self.file = file
        self.fingerprint = file.fingerprint
        self.block_bytes = file.block_bytes
        self.entries: dict[bytes, int] = {}
        self.counters: collections.Counter = collections.Counter()
        self._reset(file.num_slots)

    @property
    def num_slots(self) -> int:
        return len(self.state)

    @property
    def path(self) -> str:
        return str(self.file.path)

    # ------------------------------------------------------------ reads

    def lookup(self, h: bytes) -> int | None:
        return self.entries.get(h)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def count(self, state: SlotState) -> int:
        return int(np.count_nonzero(self.state == state))

    # ------------------------------------------------------------ writes

    def reserve(self, h: bytes, priority: int, evicted: list[bytes]) -> tuple[int, int] | None:
        assert h not in self.entries
        if self._free:
            slot = self._free.pop()
        else:
            slot = self._evict_one()
            if slot is None:
                return None
            evicted.append(self.hashes[slot])
            self.hashes[slot] = None
        gen = self.next_generation
        self.next_generation += 1
        self.state[slot] = SlotState.WRITING
        self.hashes[slot] = h
        self.generation[slot] = gen
        self.priority[slot] = priority
        return slot, gen

    def write_done(self, slot: int, ok: bool, checksum: int = 0, g2_checksum: int = 0, retire: bool = False) -> None:
        """A write ended; when ok, `checksum` (xxh3) and `g2_checksum` are what the slot header holds."""
        assert self.state[slot] == SlotState.WRITING
        if ok:
            h = self.hashes[slot]
            self.state[slot] = SlotState.STORED
            self.checksum[slot] = checksum
            self.g2_checksum[slot] = g2_checksum
            self.entries[h] = slot
            self._order.push(slot, int(self.priority[slot]))
        elif retire:
            self.state[slot] = SlotState.RETIRED
            self.hashes[slot] = None
        else:
            self._release(slot)

    # ------------------------------------------------------------ staging reads

    def begin_read(self, slot: int) -> None:
        assert self.state[slot] == SlotState.STORED
        self.state[slot] = SlotState.READING
        self._order.remove(slot)

    def read_done(self, slot: int, ok: bool) -> None:
        assert self.state[slot] == SlotState.READING
        if ok:
            self.state[slot] = SlotState.STORED
            self._order.push(slot, int(self.priority[slot]))
        else:
            del self.entries[self.hashes[slot]]
            self._release(slot)

    def drop(self, slot: int) -> None:
        assert self.state[slot] == SlotState.STORED
        self._order.remove(slot)
        del self.entries[self.hashes[slot]]
        self._release(slot)

    # ------------------------------------------------------------ recovery

    def recover(self) -> int:
        """Rebuild the index from the slot headers; returns the number of blocks found."""
        f = self.file
        headers = np.zeros(self.num_slots, g3.SLOT_HEADER_DTYPE)
        readable = 0
        for first in range(0, self.num_slots, _SCAN_CHUNK):
            count = min(_SCAN_CHUNK, self.num_slots - first)
            chunk, n = f.read_slot_headers(first, count)
            headers[first:first + n] = chunk[:n]
            readable += n
            if n < count:
                break
        if readable < self.num_slots:
            log.warning("%s is cut short: %d of %d slots readable; re-extending it", f.path, readable,
                        self.num_slots)
            self.counters["truncated_slots"] += self.num_slots - readable
            f.ensure_size()
        best: dict[bytes, int] = {}
        for slot in range(readable):
            rec = headers[slot]
            why = g3.check_slot_header(rec, self.fingerprint, self.block_bytes)
            if why is not None:
                if why != "no slot header":
                    self.counters["dropped_at_recovery"] += 1
                    log.warning("%s slot %d ignored: %s", f.path, slot, why)
                continue
            h = bytes(rec["hash"])
            other = best.get(h)
            if other is None or int(headers[other]["generation"]) < int(rec["generation"]):
                best[h] = slot
        self._reset(self.num_slots)
        order = sorted(best.values(), key=lambda s: int(headers[s]["written_ns"]))
        for slot in order:
            rec = headers[slot]
            h = bytes(rec["hash"])
            self.state[slot] = SlotState.STORED
            self.hashes[slot] = h
            self.generation[slot] = int(rec["generation"])
            self.checksum[slot] = int(rec["checksum"])
            self.g2_checksum[slot] = int(rec["g2_checksum"])
            self.priority[slot] = int(rec["priority"])
            self.entries[h] = slot
            self._order.push(slot, int(rec["priority"]))
        self._free = sorted(set(range(self.num_slots)) - set(order), reverse=True)
        if len(headers):
            self.next_generation = int(headers["generation"][:readable].max(initial=0)) + 1
        self.counters["recovered_blocks"] += len(order)
        return len(order)

    # ------------------------------------------------------------ internals

    def _reset(self, num_slots: int) -> None:
        self.entries.clear()
        self.state = np.zeros(num_slots, np.uint8)
        self.hashes: list[bytes | None] = [None] * num_slots
        self.generation = np.zeros(num_slots, np.uint64)
        self.checksum = np.zeros(num_slots, np.uint64)  # xxh3-64 of the bytes
        self.g2_checksum = np.zeros(num_slots, np.uint64)
        self.priority = np.zeros(num_slots, np.int16)
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first
        self._order = EvictionQueue(num_slots)  # STORED slots, next to evict first
        self.next_generation = 1

    def _evict_one(self) -> int | None:
        slot = self._order.pop()
        if slot < 0:
            return None
        del self.entries[self.hashes[slot]]
        self.counters["evicted_blocks"] += 1
        return slot

    def _release(self, slot: int) -> None:
        self.state[slot] = SlotState.FREE
        self.hashes[slot] = None
        self._free.append(slot)
