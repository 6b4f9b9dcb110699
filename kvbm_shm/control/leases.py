"""Client leases. Runs in the coordinator process only.

A client opens a lease with hello and keeps it alive with any request (heartbeats included).
The lease records every pin the client holds and every Partial block it is writing, per pool.
A lease ends by goodbye, by silence longer than `lease_ms`, or as soon as the client's process
is seen dead (same node: the pid is checked on every sweep). `LeaseTable.expired` hands ended
leases back to the coordinator, which drops their pins and frees their unfinished blocks, so a
crashed client leaks nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import Counter

from ..errors import LeaseError
from ..runtime import pid_alive


@dataclasses.dataclass
class Lease:
    client_id: int
    name: str
    pid: int
    expires_at: float  # time.monotonic()
    pins: dict[int, Counter] = dataclasses.field(default_factory=dict)  # pool -> block -> count
    pending: dict[int, set[int]] = dataclasses.field(default_factory=dict)  # pool -> blocks

    def num_pins(self) -> int:
        return sum(sum(c.values()) for c in self.pins.values())

    def num_pending(self) -> int:
        return sum(len(s) for s in self.pending.values())


class LeaseTable:
    def __init__(self, lease_ms: int):
        self.lease_s = lease_ms / 1000
        self._leases: dict[int, Lease] = {}
        self._ids = itertools.count(1)

    def open(self, name: str, pid: int) -> Lease:
        lease = Lease(next(self._ids), name, pid, time.monotonic() + self.lease_s)
        self._leases[lease.client_id] = lease
        return lease

    def get(self, client_id: int) -> Lease:
        """The live lease of `client_id`, renewed. LeaseError if unknown or ended."""
        lease = self._leases.get(client_id)
        if lease is None:
            raise LeaseError(f"client {client_id} has no lease (expired, or the coordinator restarted): say hello again")
        lease.expires_at = time.monotonic() + self.lease_s
        return lease

    def close(self, client_id: int) -> Lease | None:
        return self._leases.pop(client_id, None)

    def expired(self, now: float | None = None) -> list[Lease]:
        """Remove and return leases that timed out or whose process is gone."""
        now = time.monotonic() if now is None else now
        ended = [lease for lease in self._leases.values() if lease.expires_at < now or not _alive(lease.pid)]
        for lease in ended:
            del self._leases[lease.client_id]
        return ended

    def __iter__(self):
        return iter(list(self._leases.values()))

    def __len__(self) -> int:
        return len(self._leases)


def _alive(pid: int) -> bool:
    return pid <= 0 or pid_alive(pid)  # pid 0: the client gave none; only the timeout applies
