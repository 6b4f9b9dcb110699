"""The G3 admission filter: a decaying use count per sequence hash. Runs in the coordinator only.

The strategy is KVBM's `FrequencyFilter`: a hash's count starts at 1 on its first use and doubles
on every further use; every `decay_s` each count drops by one and hashes at zero are forgotten
(sooner, repeatedly, when more than `max_entries` are tracked). A block is admitted to disk when
its count reaches `2 ** (min_uses - 1)`: with the default of 2 uses, a block seen once never
reaches the disk, a block used twice recently does, and a block that was hot long ago has to
earn its place again.

A "use" is a store of the hash (`offered`: every hash of an Allocate, also one already cached)
or a lookup hit in G2. Hits are counted for free by the block table (`hits` field) and folded
in lazily by `admit` when the block comes up for write-back, so the lookup path pays nothing.
"""

from __future__ import annotations

import time

_MAX_COUNT = 1 << 30


class AdmissionFilter:
    def __init__(self, min_uses: int = 2, decay_s: float = 60.0, max_entries: int = 1 << 18):
        self.threshold = 1 << max(min_uses - 1, 0)
        self.decay_s = decay_s
        self.max_entries = max_entries
        self._counts: dict[bytes, int] = {}
        self._folded: dict[tuple[int, int], tuple[bytes, int]] = {}  # (pool, block) -> (hash, hits folded)
        self._next_decay = time.monotonic() + decay_s

    def offered(self, hashes: list[bytes]) -> None:
        counts = self._counts
        for h in hashes:
            c = counts.get(h)
            counts[h] = 1 if c is None else min(c * 2, _MAX_COUNT)
        if len(counts) > self.max_entries:
            while len(self._counts) > self.max_entries:
                self._decay()
            self._next_decay = time.monotonic() + self.decay_s

    def admit(self, pool_id: int, block_id: int, h: bytes, hits: int) -> bool:
        """Whether the block holding `h` (with `hits` G2 lookup hits so far) goes to disk."""
        key = (pool_id, block_id)
        seen = self._folded.get(key)
        folded = seen[1] if seen is not None and seen[0] == h and seen[1] <= hits else 0  # else: a new life
        if hits > folded:
            c = self._counts.get(h, 0)
            self._counts[h] = min((c << (hits - folded)) if c else 1 << (hits - folded - 1), _MAX_COUNT)
            self._folded[key] = (h, hits)
        return self._counts.get(h, 0) >= self.threshold

    def count(self, h: bytes) -> int:
        return self._counts.get(h, 0)

    def decay(self, now: float | None = None) -> None:
        """Called periodically: one decay step per elapsed `decay_s`."""
        now = time.monotonic() if now is None else now
        while now >= self._next_decay:
            self._decay()
            self._next_decay = now + self.decay_s if not self._counts else self._next_decay + self.decay_s

    def __len__(self) -> int:
        return len(self._counts)

    def _decay(self) -> None:
        self._counts = {h: c - 1 for h, c in self._counts.items() if c > 1}
