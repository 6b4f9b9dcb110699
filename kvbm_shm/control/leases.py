"""Client leases. Runs in the coordinator process only.

A client opens a lease with hello and keeps it alive with any request (heartbeats included).
The lease records every pin the client holds and every Partial block it is writing, per pool.
A lease ends by goodbye, by silence longer than `lease_ms`, or when the client's process is seen
dead (same node). `LeaseTable.expired` hands ended leases back to the coordinator, which drops
their pins and frees their unfinished blocks, so a crashed client leaks nothing.

A sweep costs O(bounded), however many leases there are (a hello flood must not stall the
loop): leases are kept in expiry order (a renewal moves the lease to the end, O(1)), so timed-out
leases are taken from the front; and at most `PID_CHECKS_PER_SWEEP` pids are checked per sweep,
round-robin over the table, so a dead process is seen within `len / PID_CHECKS_PER_SWEEP` sweeps
(and by its lease timing out at the latest). At most `MAX_ENDED_PER_SWEEP` leases end per sweep;
the rest end at the next ones. `renew_all()` gives every lease a fresh `lease_ms` (the server
calls it after a stall of its own loop, which must not count against clients).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import Counter, OrderedDict

from ..errors import LeaseError
from ..runtime import pid_alive

PID_CHECKS_PER_SWEEP = 64
MAX_ENDED_PER_SWEEP = 256


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
        self._leases: OrderedDict[int, Lease] = OrderedDict()  # in expiry order: see `_renew`
        self._ids = itertools.count(1)
        self._pid_round: list[int] = []  # client ids whose pid is still to be checked this round

    def open(self, name: str, pid: int) -> Lease:
        lease = Lease(next(self._ids), name, pid, time.monotonic() + self.lease_s)
        self._leases[lease.client_id] = lease
        return lease

    def get(self, client_id: int) -> Lease:
        """The live lease of `client_id`, renewed. LeaseError if unknown or ended."""
        lease = self._leases.get(client_id)
        if lease is None:
            raise LeaseError(f"client {client_id} has no lease (expired, or the coordinator restarted): say hello again")
        self._renew(lease, time.monotonic())
        return lease

    def close(self, client_id: int) -> Lease | None:
        return self._leases.pop(client_id, None)

    def expired(self, now: float | None = None) -> list[Lease]:
        """Remove and return leases that timed out or whose process is gone (bounded work)."""
        now = time.monotonic() if now is None else now
        ended: list[Lease] = []
        while self._leases and len(ended) < MAX_ENDED_PER_SWEEP:
            lease = next(iter(self._leases.values()))
            if lease.expires_at >= now:
                break
            ended.append(self._leases.pop(lease.client_id))
        if not self._pid_round:
            self._pid_round = list(self._leases)
        checked: dict[int, bool] = {}
        while self._pid_round and len(checked) < PID_CHECKS_PER_SWEEP and len(ended) < MAX_ENDED_PER_SWEEP:
            lease = self._leases.get(self._pid_round.pop())
            if lease is None:
                continue
            alive = checked.get(lease.pid)
            if alive is None:
                alive = checked[lease.pid] = _alive(lease.pid)
            if not alive:
                ended.append(self._leases.pop(lease.client_id))
        return ended

    def renew_all(self) -> int:
        """Give every lease a fresh `lease_s` from now; returns how many there are."""
        now = time.monotonic()
        for lease in self._leases.values():  # one expiry for all: the order stays right
            lease.expires_at = now + self.lease_s
        return len(self._leases)

    def _renew(self, lease: Lease, now: float) -> None:
        lease.expires_at = now + self.lease_s
        self._leases.move_to_end(lease.client_id)

    def __iter__(self):
        return iter(list(self._leases.values()))

    def __len__(self) -> int:
        return len(self._leases)


def _alive(pid: int) -> bool:
    """pid 0: the client gave none (only the timeout applies); a check that fails (EMFILE) is
    taken as alive: the lease still times out."""
    try:
        return pid <= 0 or pid_alive(pid)
    except OSError:
        return True
