"""Client leases. Runs in the coordinator process only.

A client opens a lease with hello and keeps it alive with any request (heartbeats included).
A lease is identified by `token`, 16 random bytes handed out in the hello reply and required by
every request that acts on the lease: unique across coordinator starts and not guessable, so one
client cannot act for another and a client of an earlier coordinator start is told its lease is
gone (`LeaseError`). `client_id` is a small number for display and block owners only.
The lease records every pin the client holds and every Partial block it is writing, per pool,
and its last few pinning or allocating requests (`recent`), so that a request the client gave
up on (timed out) can be undone by `Cancel`. A lease ends by goodbye, by silence longer than
`lease_ms`, or when the client's process is seen dead (same node). `LeaseTable.expired` hands
ended leases back to the coordinator, which drops their pins and frees their unfinished blocks,
so a crashed client leaks nothing.
`open` refuses (CAPACITY) past `max_leases` leases in all or `max_leases_per_process` of one pid.

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
import secrets
import time
from collections import Counter, OrderedDict

from ..errors import CapacityError, ErrorCode, LeaseError
from ..protocol import LEASE_TOKEN_BYTES
from ..runtime import pid_alive

PID_CHECKS_PER_SWEEP = 64
MAX_ENDED_PER_SWEEP = 256
RECENT_REQUESTS = 32  # pinning/allocating requests of a lease that a Cancel can still undo


@dataclasses.dataclass
class Held:
    """What one request left held under its lease: pins (a pinned Lookup) or Partial blocks (an Allocate)."""

    pool_id: int
    block_ids: list[int]
    pinned: bool


@dataclasses.dataclass
class Lease:
    client_id: int
    token: bytes
    name: str
    pid: int
    expires_at: float  # time.monotonic()
    pins: dict[int, Counter] = dataclasses.field(default_factory=dict)  # pool -> block -> count
    pending: dict[int, set[int]] = dataclasses.field(default_factory=dict)  # pool -> blocks
    recent: OrderedDict[int, Held] = dataclasses.field(default_factory=OrderedDict)  # req -> what it holds
    deferred_pins: set[int] = dataclasses.field(default_factory=set)  # reqs of pinned lookups waiting for G3
    cancelled: set[int] = dataclasses.field(default_factory=set)  # of those, the ones the client gave up on

    def remember(self, req: int, held: Held) -> None:
        """Record what request `req` left held, forgetting the oldest beyond RECENT_REQUESTS."""
        self.recent[req] = held
        self.recent.move_to_end(req)
        if len(self.recent) > RECENT_REQUESTS:
            self.recent.popitem(last=False)

    def pin(self, pool, req: int, ids: list[int]) -> None:
        """Pin `ids` of `pool` (a `pool.BlockPool`) under this lease for its request `req` (which
        a Cancel may undo); the pins go with the lease."""
        pool.pin(ids, self.client_id)
        self.pins.setdefault(pool.pool_id, Counter()).update(ids)
        self.remember(req, Held(pool_id=pool.pool_id, block_ids=ids, pinned=True))

    def num_pins(self) -> int:
        return sum(sum(c.values()) for c in self.pins.values())

    def num_pending(self) -> int:
        return sum(len(s) for s in self.pending.values())


class LeaseTable:
    def __init__(self, lease_ms: int, max_leases: int, max_leases_per_process: int):
        self.lease_s = lease_ms / 1000
        self.max_leases = max_leases
        self.max_leases_per_process = max_leases_per_process
        self._leases: OrderedDict[bytes, Lease] = OrderedDict()  # by token, in expiry order: see `_renew`
        self._per_pid: Counter = Counter()
        self._ids = itertools.count(1)
        self._pid_round: list[bytes] = []  # tokens whose pid is still to be checked this round

    def open(self, name: str, pid: int) -> Lease:
        if len(self._leases) >= self.max_leases:
            raise CapacityError(f"{len(self._leases)} leases are open, the most this coordinator keeps "
                                "(max_leases)", ErrorCode.CAPACITY)
        if self._per_pid[pid] >= self.max_leases_per_process:
            raise CapacityError(f"process {pid} holds {self._per_pid[pid]} leases, the most one process may "
                                "(max_leases_per_process)", ErrorCode.CAPACITY)
        lease = Lease(next(self._ids), secrets.token_bytes(LEASE_TOKEN_BYTES), name, pid,
                      time.monotonic() + self.lease_s)
        self._leases[lease.token] = lease
        self._per_pid[pid] += 1
        return lease

    def get(self, token: bytes) -> Lease:
        """The live lease of `token`, renewed. LeaseError if unknown or ended."""
        lease = self._leases.get(token)
        if lease is None:
            raise LeaseError("unknown lease (it ended, or was issued by an earlier coordinator start): "
                             "say hello again")
        self._renew(lease, time.monotonic())
        return lease

    def close(self, token: bytes) -> Lease | None:
        lease = self._leases.get(token)
        if lease is not None:
            self._remove(lease)
        return lease

    def _remove(self, lease: Lease) -> None:
        del self._leases[lease.token]
        self._per_pid[lease.pid] -= 1
        if not self._per_pid[lease.pid]:
            del self._per_pid[lease.pid]

    def expired(self, now: float | None = None) -> list[Lease]:
        """Remove and return leases that timed out or whose process is gone (bounded work)."""
        now = time.monotonic() if now is None else now
        ended: list[Lease] = []
        while self._leases and len(ended) < MAX_ENDED_PER_SWEEP:
            lease = next(iter(self._leases.values()))
            if lease.expires_at >= now:
                break
            self._remove(lease)
            ended.append(lease)
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
                self._remove(lease)
                ended.append(lease)
        return ended

    def renew_all(self) -> int:
        """Give every lease a fresh `lease_s` from now; returns how many there are."""
        now = time.monotonic()
        for lease in self._leases.values():  # one expiry for all: the order stays right
            lease.expires_at = now + self.lease_s
        return len(self._leases)

    def _renew(self, lease: Lease, now: float) -> None:
        lease.expires_at = now + self.lease_s
        self._leases.move_to_end(lease.token)

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
