"""What the other nodes of the cluster hold: (namespace fingerprint, sequence hash) -> {node: tier}.

Fed by the peers' KV events (`apply`: G2 blocks only, what a peer serves) and by resyncs (`add`);
read by lookups (`run_on`: the node holding the longest run). It is a hint: a node may have evicted
a block since, and the fetch that follows finds out (a miss, never wrong bytes). Bounded: at most
`max_entries` keys; past that the oldest keys are dropped. `drop_node` forgets everything a node
announced (its etcd key went, or a resync of it starts). Thread-safe: the cluster's event thread
writes, the coordinator's loop reads; each call holds the lock for O(batch) dict operations.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from .. import protocol as p


class RemoteIndex:
    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, bytes], dict[str, int]] = OrderedDict()
        self._by_node: dict[str, set[tuple[str, bytes]]] = {}
        self._lock = threading.Lock()
        self.dropped = 0  # keys dropped to stay within max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {node: len(keys) for node, keys in self._by_node.items()}

    def add(self, node: str, fingerprint: str, hashes: list[bytes], tier: int) -> None:
        with self._lock:
            mine = self._by_node.setdefault(node, set())
            for h in hashes:
                key = (fingerprint, h)
                where = self._entries.get(key)
                if where is None:
                    where = self._entries[key] = {}
                else:
                    self._entries.move_to_end(key)
                where[node] = tier
                mine.add(key)
            while len(self._entries) > self.max_entries:
                key, where = self._entries.popitem(last=False)
                for n in where:
                    self._by_node[n].discard(key)
                self.dropped += 1

    def remove(self, node: str, fingerprint: str, hashes: list[bytes]) -> None:
        with self._lock:
            mine = self._by_node.get(node)
            if mine is None:
                return
            for h in hashes:
                key = (fingerprint, h)
                where = self._entries.get(key)
                if where is None or node not in where:
                    continue
                del where[node]
                mine.discard(key)
                if not where:
                    del self._entries[key]

    def drop_node(self, node: str) -> int:
        with self._lock:
            keys = self._by_node.pop(node, set())
            for key in keys:
                where = self._entries.get(key)
                if where is not None:
                    where.pop(node, None)
                    if not where:
                        del self._entries[key]
            return len(keys)

    def drop_fingerprint(self, node: str, fingerprint: str) -> None:
        with self._lock:
            mine = self._by_node.get(node, set())
            for key in [k for k in mine if k[0] == fingerprint]:
                mine.discard(key)
                where = self._entries.get(key)
                if where is not None:
                    where.pop(node, None)
                    if not where:
                        del self._entries[key]

    def apply(self, node: str, events: list) -> None:
        """A batch of a node's KV events (protocol.Event structs). Only G2 counts: a peer serves
        remote reads from its G2 pools (a block only on its disk is not servable to us)."""
        for e in events:
            if isinstance(e, p.BlockStored) and e.tier == p.Tier.CPU:
                self.add(node, e.fingerprint, e.hashes, e.tier)
            elif isinstance(e, p.BlockRemoved) and e.tier == p.Tier.CPU:
                self.remove(node, e.fingerprint, e.hashes)
            elif isinstance(e, p.PoolCleared):
                self.drop_fingerprint(node, e.fingerprint)

    def run_on(self, fingerprint: str, hashes: list[bytes], exclude: set[str] = frozenset()) -> tuple[str, int]:
        """The node that holds the longest run from `hashes[0]` on, and the run's length (0: none)."""
        with self._lock:
            first = self._entries.get((fingerprint, hashes[0])) if hashes else None
            if not first:
                return "", 0
            best, best_n = "", 0
            for node in first:
                if node in exclude:
                    continue
                n = 0
                for h in hashes:
                    where = self._entries.get((fingerprint, h))
                    if where is None or node not in where:
                        break
                    n += 1
                if n > best_n:
                    best, best_n = node, n
            return best, best_n
