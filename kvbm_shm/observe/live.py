"""What `kvbm-shm top` shows: usage and rates between two Stats samples of a running coordinator.

`summarize(current, previous, interval_s, own_requests)` turns `protocol.StatsReply` samples into
a `TopView`. Usage is per tier (G2: the shm pools; blocks in use are registered or being written,
their bytes counted at the block size). Rates are per second over the interval between the two
samples and None for the first one; `own_requests` (the observer's own Stats calls) are left out
of requests/s. Byte rates are block counts times their pool's block size: `store` is what stores
wrote into G2, `hit` what lookups matched in G2. `cluster` (with `--cluster`): this node, the other
nodes it sees, the size of its remote index, and the blocks and bytes read from other nodes (G4).
"""

from __future__ import annotations

import msgspec

from .. import protocol as p


class TierUsage(msgspec.Struct):
    tier: str
    capacity_bytes: int  # the budget of the tier
    allocated_bytes: int  # what its pools take (segments)
    used_bytes: int  # blocks in use x block size
    blocks: int
    used_blocks: int
    pinned_blocks: int


class PoolRow(msgspec.Struct):
    pool_id: int
    model: str
    num_blocks: int
    registered: int
    partial: int
    pinned: int
    inactive: int
    hit_rate: float | None  # over the pool's life


class ClusterView(msgspec.Struct):
    node: str
    etcd: str  # reachable, unreachable
    nodes: list[str]  # the other nodes this node sees
    index_blocks: int
    remote_hit_blocks: int
    remote_hit_bytes: int
    remote_hit_bytes_per_s: float | None
    failures: int  # fetches that failed (peer errors, reads, checksums, deadlines)


class TopView(msgspec.Struct):
    instance: str
    pid: int
    uptime_s: float
    interval_s: float | None
    tiers: list[TierUsage]
    requests_total: int
    errors_total: int
    requests_per_s: float | None
    lookups_per_s: float | None
    hit_rate: float | None  # over the interval
    hit_rate_total: float | None
    store_bytes_per_s: float | None
    hit_bytes_per_s: float | None
    evictions_per_s: float | None
    pools: list[PoolRow]
    clients: list[p.ClientInfo]
    cluster: ClusterView | None = None


def _sum(stats: p.StatsReply, counter: str, weighted: bool = False) -> int:
    return sum(pool.counters.get(counter, 0) * (pool.block_bytes if weighted else 1) for pool in stats.pools)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def summarize(current: p.StatsReply, previous: p.StatsReply | None = None, interval_s: float | None = None,
              own_requests: int = 1) -> TopView:
    pools = current.pools
    g2 = TierUsage(
        tier="g2", capacity_bytes=current.cpu_cache_bytes, allocated_bytes=current.cpu_used_bytes,
        used_bytes=sum((x.registered + x.partial) * x.block_bytes for x in pools),
        blocks=sum(x.num_blocks for x in pools), used_blocks=sum(x.registered + x.partial for x in pools),
        pinned_blocks=sum(x.pinned for x in pools))
    rows = [PoolRow(x.pool_id, x.model, x.num_blocks, x.registered, x.partial, x.pinned, x.inactive,
                    _ratio(x.counters.get("hit_blocks", 0), x.counters.get("lookup_blocks", 0))) for x in pools]
    requests = current.counters.get("requests", 0)
    errors = sum(v for k, v in current.counters.items() if k.startswith("error_"))
    rates: dict[str, float | None] = dict.fromkeys(
        ("requests_per_s", "lookups_per_s", "hit_rate", "store_bytes_per_s", "hit_bytes_per_s", "evictions_per_s"))
    if previous is not None and previous.instance_id == current.instance_id and interval_s:
        def rate(now: int, before: int) -> float:
            return max(now - before, 0) / interval_s

        rates.update(
            requests_per_s=rate(requests - own_requests, previous.counters.get("requests", 0)),
            lookups_per_s=rate(_sum(current, "lookups"), _sum(previous, "lookups")),
            hit_rate=_ratio(_sum(current, "hit_blocks") - _sum(previous, "hit_blocks"),
                            _sum(current, "lookup_blocks") - _sum(previous, "lookup_blocks")),
            store_bytes_per_s=rate(_sum(current, "stored_blocks", True), _sum(previous, "stored_blocks", True)),
            hit_bytes_per_s=rate(_sum(current, "hit_blocks", True), _sum(previous, "hit_blocks", True)),
            evictions_per_s=rate(_sum(current, "evicted_blocks"), _sum(previous, "evicted_blocks")))
    return TopView(
        cluster=_cluster(current, previous, interval_s),
        instance=current.instance, pid=current.pid, uptime_s=current.uptime_s,
        interval_s=interval_s if previous is not None else None, tiers=[g2], requests_total=requests,
        errors_total=errors, hit_rate_total=_ratio(_sum(current, "hit_blocks"), _sum(current, "lookup_blocks")),
        pools=rows, clients=list(current.clients), **rates)


def _cluster(current: p.StatsReply, previous: p.StatsReply | None, interval_s: float | None) -> ClusterView | None:
    g4 = current.tiers.get("g4")
    if not g4:
        return None
    counters = g4.get("counters", {})
    read = counters.get("remote_hit_bytes", 0)
    before = previous.tiers.get("g4", {}).get("counters", {}) if previous is not None else None
    per_s = (max(read - before.get("remote_hit_bytes", 0), 0) / interval_s
             if before is not None and previous.instance_id == current.instance_id and interval_s else None)
    failures = sum(counters.get(k, 0) for k in ("fetch_errors", "read_failures", "checksum_failures", "fetch_timeouts"))
    return ClusterView(node=g4.get("node", ""), etcd=g4.get("etcd", ""), nodes=sorted(g4.get("nodes", {})),
                       index_blocks=g4.get("index_blocks", 0), remote_hit_blocks=counters.get("remote_hit_blocks", 0),
                       remote_hit_bytes=read, remote_hit_bytes_per_s=per_s, failures=failures)
