"""The contract of a tier: what the coordinator tells every tier, and what a tier may answer.

Runs in the coordinator process, on its loop thread. G2 (the shm pools, `pool.BlockPool`) is the
hub: every other tier (G1 device, G3 disk, G4 cluster, later object storage) moves bytes to or
from G2 blocks, and sees a pool only through its face (`pool` module docstring): its lifecycle
calls and read methods, never its table or registry. A tier is one module with a `Tier` subclass;
the coordinator keeps its tiers in a list (in lookup order: disk before cluster) and calls every
hook on each of them. Every hook has a no-op default, so a tier implements only what it needs. No
hook may block: work that waits (disk I/O, a transfer, a network read) runs in a worker process
or thread and comes back as a future.

A tier never sees the coordinator. Its constructor takes, by keyword, the narrow things it uses:
the `LeaseTable` (handlers that act for a lease), `pool_of(pool_id)` (the pool or UNKNOWN_POOL),
its `WorkerGroup` as a zero-argument callable (groups start after the tiers), a `Store` (allocate
and commit that also tell the other tiers, for a tier that stores into G2 on a client's behalf),
and `TierEvents`, the one sink for what it reports: KV events, counters, and finished transfers
(bytes by path, which `metrics` listens to).

Hooks (each gets a batch; the coordinator has already checked ids, leases and ownership):

- `attach(pool, namespace)`: a G2 pool exists (created, or recovered after a restart).
- `on_allocated(pool, hashes)`: an Allocate asked for `hashes` (all of them, cached or not).
- `on_committed(pool, block_ids)`: blocks a client stored (engine-driven, or offloaded by a
  transfer worker) became Registered in G2 (matchable). Blocks staged from a tier are not
  reported here: they came from a tier, and that tier has them.
- `on_removed(pool, hashes)`: blocks left G2 (evicted or invalidated); the tier may still hold
  copies of them.
- `prepare_load(pool, hashes, g2_ids) -> Staging | None`: a lookup's G2 prefix (`g2_ids`, the
  blocks of the first `len(g2_ids)` hashes) ended before its last hash. A tier that holds the
  next hashes stages them into freshly allocated G2 blocks and returns a `Staging`; otherwise
  None, cheaply (one dict lookup is the budget on this path). The coordinator asks its tiers in
  order and takes the first Staging; when that Staging's prefix still ends early, the next tiers
  are asked for the rest.
- `end_lease(lease)`: a client's lease ended (goodbye, expiry, death): drop what it held here.
- `handlers() -> {request type: handler}`: requests this tier answers itself (G1's RegisterDevice,
  Offload, ...). A handler returns a reply or a `Deferred`, like the coordinator's own; the
  server wakes when a Deferred's future is done (a done callback), or at its `deadline`.
- `sweep(now)`: periodic work (decay, planning, reaping), every loop tick that has time.
- `stats() -> dict`: this tier's fields of the Stats reply (e.g. `{"disks": [...]}`, or
  `{"tiers": {"g4": {...}}}` for a tier without fields of its own).
- `close()`: clean shutdown, before the pools go.
- Prometheus: `hits(pool_id)`, blocks this tier supplied to the pool's lookups
  (`kvbm_hit_blocks{tier=name}`; None: not counted here), and `metric_families(Counter, Gauge)`,
  this tier's own series (the family classes come from prometheus-client, passed in by `metrics`).

A `Staging` is the promise of a verified prefix: `future` is done when every byte it waited for
has arrived and been checked; `result()` is then `(block_ids, tiers)`, the G2 blocks of the
verified prefix and the tier each came from (a block that failed verification ends the prefix;
it is never served); `release()` drops the pins the staging held to keep its blocks from being
evicted before the lookup's own pins are taken. The coordinator calls `release()` exactly once,
after it has pinned (or not) what the lookup returns.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
from collections import Counter
from typing import TYPE_CHECKING, Callable, Iterable, Protocol

from .. import protocol as p

if TYPE_CHECKING:
    from ..layout import Namespace
    from .leases import Lease
    from .pool import BlockPool as PoolFace


@dataclasses.dataclass
class Deferred:
    """A reply that waits for `future`; `finish(future)` turns the finished future into the reply.
    `deadline` (monotonic seconds): when the server asks `future.done()` again even if nothing woke
    it (a wait with a timeout)."""

    req: int
    future: concurrent.futures.Future
    finish: Callable[[concurrent.futures.Future], p.Reply]
    deadline: float = math.inf


class TierEvents:
    """The sink every tier reports to, on the loop thread: KV events (`event`), coordinator
    counters (`count`), and finished transfers (`transferred`: bytes on a path such as
    "g2_to_g3", and seconds), which every listener added with `on_transfer` hears."""

    def __init__(self, emit: Callable[[p.Event], None], counters: Counter):
        self.event = emit
        self._counters = counters
        self._transfer_listeners: list[Callable[[str, int, float], None]] = []

    def count(self, name: str, n: int = 1) -> None:
        self._counters[name] += n

    def on_transfer(self, listener: Callable[[str, int, float], None]) -> None:
        self._transfer_listeners.append(listener)

    def transferred(self, path: str, nbytes: int, seconds: float) -> None:
        for listener in self._transfer_listeners:
            listener(path, nbytes, seconds)


class Store(Protocol):
    """G2 stores on a client's behalf that every tier hears of (`on_allocated`, `on_committed`)."""

    def allocate(self, pool: PoolFace, hashes: list[bytes], client_id: int) -> list[int]: ...

    def commit(self, pool: PoolFace, ids: list[int], checksums: list[int], priority: int) -> int: ...


class Staging(Protocol):
    future: concurrent.futures.Future

    def result(self) -> tuple[list[int], list[int]]: ...

    def release(self) -> None: ...


class Tier:
    """Base class of a tier: every hook is a no-op. See the module docstring for the contract."""

    name = ""  # "g1", "g3", "g4": the tier's key in stats and logs

    @property
    def below_g2(self) -> bool:
        """Whether this tier can hold blocks G2 lacks: it stages loads (implements `prepare_load`).
        While any tier is, clients ask the coordinator about what their pool's hash index lacks."""
        return type(self).prepare_load is not Tier.prepare_load

    def attach(self, pool: PoolFace, namespace: Namespace) -> None:
        pass

    def on_allocated(self, pool: PoolFace, hashes: list[bytes]) -> None:
        pass

    def on_committed(self, pool: PoolFace, block_ids: list[int]) -> None:
        pass

    def on_removed(self, pool: PoolFace, hashes: list[bytes]) -> None:
        pass

    def prepare_load(self, pool: PoolFace, hashes: list[bytes], g2_ids: list[int]) -> Staging | None:
        return None

    def end_lease(self, lease: Lease) -> None:
        pass

    def handlers(self) -> dict[type, Callable]:
        return {}

    def sweep(self, now: float) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def hits(self, pool_id: int) -> int | None:
        return None

    def metric_families(self, counter_family: type, gauge_family: type) -> Iterable:
        return ()

    def close(self) -> None:
        pass
