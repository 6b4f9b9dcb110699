"""One instance's pools, read straight from shared memory: running, hung or dead coordinator.

`inspect_instance(instance, instance_dir, ...) -> InstanceReport` maps each pool segment of the
instance read-only (lazily: only header and block table are touched) and reports per pool its
geometry and namespace, blocks by state and tier, pinned blocks by client, the shared counters
(lookups, hits, stores, evictions, ...), and the most reused prefixes; optionally every block
record (`blocks=True`) or the blocks whose sequence hash starts with `hash_prefix` (hex digits;
with a check of their bytes against the recorded checksum).

Consistency: the coordinator is the only writer and brackets every record update with
`generation += 1` (odd while writing). While it runs, records are read with the seqlock rule
(`PoolSegment.read_records`). When it is dead, nothing moves any more: the table is copied once,
and a record left with an odd generation (killed mid-update) is reported as `torn` and counted
nowhere else. A segment that cannot be read as a pool becomes an entry in `errors`, never an
exception: a report is still made of the others.

`coordinator.state` says where the numbers come from:
- `running`: the coordinator answered a Stats request; clients carry names and lease details.
- `not answering`: its process is alive but did not answer within `timeout_s` (hung, stopped);
  the report is shared memory only.
- `alive`: its process is alive but has no runtime file under the given runtime directory (it
  runs with another one), or the runtime directory or the process listening there is not ours
  to trust (`runtime.trusted_info`), so it was not asked; shared memory only.
- `dead`: no process of the instance is alive: a post-mortem view. Pins and partial blocks are
  those at the time of death; a new coordinator of the instance adopts the registered blocks and
  drops the rest (`Coordinator.recover`).
- `absent`: nothing of the instance on this node.
Pin holders come from the records' `owner` field, which names the last client that pinned a block.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import numpy as np

from .. import protocol as p
from ..errors import CoordinatorUnavailable, CorruptionError, ForeignError, KvbmError
from ..kernels.cpu_copy import checksum
from ..layout import Namespace
from ..shm import COUNTER_NAMES, BlockState, PoolSegment
from . import node
from .probe import StatsProbe, find_endpoint

TIER_NAMES = {p.Tier.DEVICE: "g1", p.Tier.CPU: "g2", p.Tier.DISK: "g3"}
STATE_NAMES = {BlockState.RESET: "free", BlockState.PARTIAL: "partial", BlockState.COMPLETE: "complete",
               BlockState.REGISTERED: "registered"}


class Geometry(msgspec.Struct):
    num_blocks: int
    block_bytes: int
    block_stride: int
    segment_bytes: int
    num_layers: int
    outer_dim: int
    page_size: int
    inner_dim: int
    dtype: str
    tp_rank: int
    tp_size: int


class BlockCounts(msgspec.Struct):
    free: int
    partial: int
    complete: int
    registered: int
    pinned: int  # ref count > 0 (a pinned block invalidated meanwhile is still pinned)
    inactive: int  # registered and not pinned: what eviction may take
    torn: int  # left mid-update by a dead coordinator
    invalid: int  # a state value no coordinator writes


class PinHolder(msgspec.Struct):
    client_id: int
    blocks: int
    refs: int
    name: str | None = None
    pid: int | None = None


class BlockRecord(msgspec.Struct):
    block: int
    state: str
    tier: str
    hash: str
    refcount: int
    owner: int
    hits: int
    priority: int
    checksum: str
    last_use_age_s: float | None
    generation: int
    torn: bool = False
    checksum_ok: bool | None = None  # only with a hash query: the bytes match the checksum


class PoolReport(msgspec.Struct):
    segment: str
    pool_id: int
    model: str
    fingerprint: str
    coordinator_pid: int
    created_unix: float
    geometry: Geometry
    blocks: BlockCounts
    registered_by_tier: dict[str, int]
    pinned_by_client: list[PinHolder]
    counters: dict[str, int]
    hit_rate: float | None  # hit blocks / looked-up blocks over the segment's life
    top_prefixes: list[BlockRecord]
    records: list[BlockRecord] | None = None


class SegmentError(msgspec.Struct):
    segment: str
    error: str  # names the segment


class CoordinatorState(msgspec.Struct):
    state: str  # "running", "not answering", "alive", "dead" or "absent" (see the module docstring)
    pid: int | None
    note: str = ""


class InstanceReport(msgspec.Struct):
    instance: str
    coordinator: CoordinatorState
    pools: list[PoolReport]
    errors: list[SegmentError]
    clients: list[p.ClientInfo] | None = None  # only from a running coordinator
    cluster: dict | None = None  # the cluster tier's stats (G4), from a running coordinator with --cluster


def inspect_instance(instance: str, instance_dir: Path, *, timeout_s: float = 1.0, top: int = 10,
                     blocks: bool = False, hash_prefix: str | None = None) -> InstanceReport:
    names = node.instance_segments(instance)
    infos = []
    for name in names:
        try:
            infos.append(node.read_segment(name))
        except FileNotFoundError:
            continue
    coordinator, stats = _coordinator_state(instance_dir, infos, timeout_s)
    clients = {c.client_id: c for c in stats.clients} if stats else {}
    writer_alive = coordinator.state in ("running", "not answering", "alive")
    pools, errors = [], []
    for info in infos:
        if info.kind != "pool":
            errors.append(SegmentError(info.name, info.error or f"segment {info.name} is not a kvbm pool"))
            continue
        try:
            pools.append(_pool_report(info.name, writer_alive, clients, top, blocks, hash_prefix))
        except FileNotFoundError:
            continue
        except (KvbmError, OSError) as e:
            errors.append(SegmentError(info.name, str(e) if isinstance(e, KvbmError) else f"segment {info.name}: {e}"))
    return InstanceReport(instance, coordinator, pools, errors, list(stats.clients) if stats else None,
                          stats.tiers.get("g4") if stats else None)


def _coordinator_state(instance_dir: Path, infos: list[node.SegmentInfo], timeout_s: float
                       ) -> tuple[CoordinatorState, p.StatsReply | None]:
    alive = [i.owner_pid for i in infos if i.kind == "pool" and node.owner_alive(i)]
    holder = node.lock_holder(instance_dir) if Path(instance_dir).exists() else None
    pid = alive[0] if alive else holder
    if pid is None:
        last = next((i.owner_pid for i in infos if i.owner_pid), None)
        if infos:
            return CoordinatorState("dead", last, "post-mortem: shared memory as the coordinator left it"), None
        return CoordinatorState("absent", None, "no segments and no live coordinator of this instance"), None
    try:
        endpoint = find_endpoint(instance_dir)
    except CoordinatorUnavailable as e:
        return CoordinatorState("alive", pid, f"{e} (pass the runtime directory it uses); "
                                              "showing shared memory only"), None
    except ForeignError as e:
        return CoordinatorState("alive", pid, f"{e}; not asked, showing shared memory only"), None
    try:
        with StatsProbe(endpoint, timeout_s) as probe:
            stats = probe.stats()
    except CoordinatorUnavailable as e:
        return CoordinatorState("not answering", pid, f"{e}; showing shared memory only"), None
    return CoordinatorState("running", stats.pid), stats


def _pool_report(name: str, writer_alive: bool, clients: dict[int, p.ClientInfo], top: int, blocks: bool,
                 hash_prefix: str | None) -> PoolReport:
    seg = PoolSegment.attach(name, writable=False, populate=False)
    try:
        return _report(seg, writer_alive, clients, top, blocks, hash_prefix)
    finally:
        seg.close()


def _report(seg: PoolSegment, writer_alive: bool, clients: dict[int, p.ClientInfo], top: int, blocks: bool,
            hash_prefix: str | None) -> PoolReport:
    h = seg.header
    try:
        ns = msgspec.msgpack.decode(seg.namespace_bytes, type=Namespace)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise CorruptionError(f"segment {seg.name}: namespace in the header does not decode: {e}") from e
    records, torn = read_table(seg, writer_alive)
    now_ns = time.monotonic_ns()
    ok = ~torn
    state, refcount = records["state"], records["refcount"]
    registered = ok & (state == BlockState.REGISTERED)
    pinned = ok & (refcount > 0)
    counts = BlockCounts(
        free=int(np.count_nonzero(ok & (state == BlockState.RESET))),
        partial=int(np.count_nonzero(ok & (state == BlockState.PARTIAL))),
        complete=int(np.count_nonzero(ok & (state == BlockState.COMPLETE))),
        registered=int(np.count_nonzero(registered)),
        pinned=int(np.count_nonzero(pinned)),
        inactive=int(np.count_nonzero(registered & (refcount == 0))),
        torn=int(np.count_nonzero(torn)),
        invalid=int(np.count_nonzero(ok & (state > BlockState.REGISTERED))))
    tiers, tier_counts = np.unique(records["tier"][registered], return_counts=True)
    counters = {n: int(v) for n, v in zip(COUNTER_NAMES, h["counters"][:len(COUNTER_NAMES)])}
    looked = counters.get("lookup_blocks", 0)
    geometry = Geometry(seg.num_blocks, seg.block_bytes, seg.block_stride, seg.segment.size, ns.kv.num_layers,
                        ns.kv.outer_dim, ns.kv.page_size, ns.kv.inner_dim, ns.kv.dtype, ns.tp_rank, ns.tp_size)
    hot = np.flatnonzero(registered)
    hot = hot[np.lexsort((records["last_use_ns"][hot], records["hits"][hot]))[::-1]][:top]  # most hits, then recent
    if hash_prefix is not None:
        shown = _matching(records, ok, hash_prefix)
    elif blocks:
        shown = np.flatnonzero(torn | (state != BlockState.RESET) | (refcount > 0))
    else:
        shown = None
    listed = None
    if shown is not None:
        listed = [_record(records, b, torn, now_ns) for b in shown.tolist()]
        if hash_prefix is not None:
            for rec in listed:
                rec.checksum_ok = _verify(seg, rec) if rec.state == "registered" else None
    report = PoolReport(
        segment=seg.name, pool_id=int(h["pool_id"]), model=ns.model, fingerprint=seg.fingerprint,
        coordinator_pid=int(h["coordinator_pid"]), created_unix=int(h["created_ns"]) / 1e9, geometry=geometry,
        blocks=counts, registered_by_tier={_tier(t): int(n) for t, n in zip(tiers.tolist(), tier_counts.tolist())},
        pinned_by_client=_pin_holders(records, pinned, clients), counters=counters,
        hit_rate=counters.get("hit_blocks", 0) / looked if looked else None,
        top_prefixes=[_record(records, b, torn, now_ns) for b in hot.tolist()], records=listed)
    del h
    return report


def read_table(seg: PoolSegment, writer_alive: bool) -> tuple[np.ndarray, np.ndarray]:
    """A copy of the block table and a mask of torn records (see the module docstring)."""
    if writer_alive:
        try:
            records = seg.read_records()
            return records, np.zeros(len(records), bool)
        except CorruptionError:  # a stopped writer left records mid-update: report them as torn
            pass
    records = np.array(seg.table)
    return records, records["generation"] % 2 == 1


def _pin_holders(records: np.ndarray, pinned: np.ndarray, clients: dict[int, p.ClientInfo]) -> list[PinHolder]:
    owners = records["owner"][pinned]
    refs = records["refcount"][pinned].astype(np.int64)
    ids, num_blocks = np.unique(owners, return_counts=True)
    out = []
    for client_id, n in zip(ids.tolist(), num_blocks.tolist()):
        info = clients.get(client_id)
        out.append(PinHolder(client_id, n, int(refs[owners == client_id].sum()),
                             info.name if info else None, info.pid if info else None))
    return out


def _matching(records: np.ndarray, ok: np.ndarray, hash_prefix: str) -> np.ndarray:
    prefix = hash_prefix.lower()
    live = np.flatnonzero(ok & (records["state"] != BlockState.RESET))  # a free block keeps a stale hash
    return np.asarray([b for b in live.tolist() if bytes(records["hash"][b]).hex().startswith(prefix)], np.int64)


def _record(records: np.ndarray, b: int, torn: np.ndarray, now_ns: int) -> BlockRecord:
    r = records[b]
    last = int(r["last_use_ns"])
    state = int(r["state"])
    return BlockRecord(
        block=b, state=STATE_NAMES.get(state, f"invalid({state})"), tier=_tier(int(r["tier"])),
        hash=bytes(r["hash"]).hex(), refcount=int(r["refcount"]), owner=int(r["owner"]), hits=int(r["hits"]),
        priority=int(r["priority"]), checksum=f"{int(r['checksum']):016x}",
        last_use_age_s=round((now_ns - last) / 1e9, 3) if last else None, generation=int(r["generation"]),
        torn=bool(torn[b]))


def _verify(seg: PoolSegment, rec: BlockRecord) -> bool | None:
    """Whether the block's bytes match its checksum; None when it changed while we read."""
    good = checksum(seg.block(rec.block)) == int(rec.checksum, 16)
    return good if int(seg.table["generation"][rec.block]) == rec.generation else None


def _tier(value: int) -> str:
    return TIER_NAMES.get(value, str(value))
