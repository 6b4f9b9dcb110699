"""Eviction order over a fixed set of slots (G2 blocks, G3 slots): lowest priority class first,
then least recently used. Every operation is O(1) per slot; nothing is sorted and nothing is
allocated per operation.

The order is a doubly linked list per priority class over arrays sized once (vLLM's
`FreeKVCacheBlockQueue` is the model): `next`/`prev` hold one entry per slot plus one sentinel
per class, each class a ring through its sentinel, least recently used first; a slot not in
the queue links to -1.

Priority classes: a client's priority is any int16; eviction knows `NUM_CLASSES` classes only,
so no client can make the coordinator keep an unbounded number of buckets. A priority falls in
the class `priority_class(priority)`, by these bounds:

    class  0: <= -257    1: -256..-17    2: -16..-2    3: -1
    class  4: 0 (the default)    5: 1..15    6: 16..255    7: >= 256

Lower classes are evicted first; priorities in one class are equal to eviction (then LRU).

Contract (`EvictionQueue(capacity)`; a slot is in the queue or not):
- `push(slot, priority, front=False)`: enqueue at the recent end of its class (`front`: at the
  eviction end, next in line).
- `remove(slot) -> bool`: take it out (pinned, invalidated, read); False if it was not in.
- `touch(ids)`: the slots of `ids` that are in the queue become the most recent of their class,
  in the order given (a lookup's hits). A run of ids already adjacent in the list moves as one
  splice, so a prefix stored together and looked up together costs O(1) Python work.
- `to_front(slot)`: move a queued slot to the eviction end of its class.
- `pop() -> int`: the next slot to evict (removed), or -1 when the queue is empty.
- `order(limit) -> list[int]`: the next `limit` slots `pop` would return, first first.
- `slot in queue`, `len(queue)`.
"""

from __future__ import annotations

import bisect

NUM_CLASSES = 8
_CLASS_BOUNDS = (-256, -16, -1, 0, 1, 16, 256)


def priority_class(priority: int) -> int:
    """The eviction class (0..NUM_CLASSES-1) of a client priority; lower is evicted first."""
    return bisect.bisect_right(_CLASS_BOUNDS, priority)


class EvictionQueue:
    def __init__(self, capacity: int):
        self.capacity = capacity
        # Python lists, not numpy: the loop reads and writes them one slot at a time, where a
        # list access is several times cheaper than a numpy scalar access
        self._next = list(range(capacity + NUM_CLASSES))  # sentinels link to themselves
        self._prev = list(range(capacity + NUM_CLASSES))
        self._class = [-1] * capacity  # -1: not queued
        self._sizes = [0] * NUM_CLASSES

    def __len__(self) -> int:
        return sum(self._sizes)

    def __contains__(self, slot: int) -> bool:
        return self._class[slot] >= 0

    def push(self, slot: int, priority: int, front: bool = False) -> None:
        c = priority_class(priority)
        head = self.capacity + c
        self._link(slot, head if front else self._prev[head])
        self._class[slot] = c
        self._sizes[c] += 1

    def remove(self, slot: int) -> bool:
        c = self._class[slot]
        if c < 0:
            return False
        self._unlink(slot)
        self._class[slot] = -1
        self._sizes[c] -= 1
        return True

    def pop(self) -> int:
        for c, n in enumerate(self._sizes):
            if n:
                slot = self._next[self.capacity + c]
                self._unlink(slot)
                self._class[slot] = -1
                self._sizes[c] = n - 1
                return slot
        return -1

    def to_front(self, slot: int) -> None:
        c = self._class[slot]
        if c >= 0:
            self._unlink(slot)
            self._link(slot, self.capacity + c)

    def touch(self, ids: list[int]) -> None:
        # runs of ids that follow each other in a list (one class: each class is its own ring;
        # an unqueued slot links to nothing) move as one splice each
        following = list(map(self._next.__getitem__, ids))
        if following[:-1] == ids[1:]:  # the common case: one run (a prefix stored and looked up together)
            if ids:
                self._move_run(ids, 0, len(ids) - 1)
            return
        start = 0
        for i, (f, b) in enumerate(zip(following, ids[1:])):
            if f != b:
                self._move_run(ids, start, i)
                start = i + 1
        if ids:
            self._move_run(ids, start, len(ids) - 1)

    def order(self, limit: int) -> list[int]:
        out: list[int] = []
        nxt = self._next
        for c in range(NUM_CLASSES):
            head = self.capacity + c
            slot = nxt[head]
            while slot != head and len(out) < limit:
                out.append(slot)
                slot = nxt[slot]
            if len(out) >= limit:
                break
        return out

    # ------------------------------------------------------------ links

    def _move_run(self, ids: list[int], start: int, end: int) -> None:
        """Move ids[start..end], linked in that order in one class's ring, to its recent end."""
        first, last = ids[start], ids[end]
        c = self._class[first]
        if c < 0:  # not queued (then a run of one: it links to nothing)
            return
        nxt, prev = self._next, self._prev
        head = self.capacity + c
        if prev[head] == last:
            return
        before, after = prev[first], nxt[last]
        nxt[before] = after
        prev[after] = before
        tail = prev[head]
        nxt[tail] = first
        prev[first] = tail
        nxt[last] = head
        prev[head] = last

    def _link(self, slot: int, after: int) -> None:
        nxt, prev = self._next, self._prev
        following = nxt[after]
        prev[slot] = after
        nxt[slot] = following
        nxt[after] = slot
        prev[following] = slot

    def _unlink(self, slot: int) -> None:
        nxt, prev = self._next, self._prev
        before, after = prev[slot], nxt[slot]
        nxt[before] = after
        prev[after] = before
        nxt[slot] = prev[slot] = -1
