"""The cluster tier (G4) in the coordinator: remote hits from other nodes' G2 pools, and serving
this node's G2 blocks to them. Runs on the coordinator's loop; every remote call and every NIXL
operation runs on the threads of `cluster.node.ClusterNode`, so no hook blocks.

Built only with `--cluster` (`ClusterTier.open(config, instance_id=, leases=, endpoint=)`, after
the server bound its `cluster.endpoint.PeerEndpoint`). Like every tier it sees the lease table
(peers' requests act under their leases) and the pools it was attached to, never the coordinator.

- `attach(pool, ns)`: registers the pool's data region with NIXL, in the agent process (peers
  read it; our fetches land in it) and announces the namespace in this node's etcd record.
- `prepare_load(pool, hashes, g2_ids)`: when the remote index says a node holds the next hash,
  pins the G2 prefix, allocates staging G2 blocks for the run that node holds and asks
  the transfer thread to fetch them (`ClusterNode.fetch`, deadline `cluster_deadline_ms`). The
  `Staging` it returns commits the verified prefix (tier 4 in the reply; Registered in G2, so the
  next lookup on this node hits in G2), frees the rest, and answers within the deadline (plus the
  agent process's grace: a read that overruns kills that process, so nothing lands in freed blocks).
- Handlers for peers (`PeerPin`, `PeerContents`; served only on the cluster endpoint): pins under
  the peer's lease the G2 prefix it asks for, or pages through the hashes of every pool.
- `stats()`: node, members, index size, counters (remote hits and bytes, failures), as
  `tiers["g4"]` of the Stats reply; `hits(pool_id)` and `metric_families` for Prometheus.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections import Counter

from .. import protocol as p
from ..cluster.endpoint import PeerEndpoint
from ..cluster.node import ClusterNode, FetchResult
from ..config import ServiceConfig
from ..layout import Namespace
from .leases import LeaseTable
from .pool import BlockPool
from .tier import Tier

log = logging.getLogger(__name__)


class RemoteStaging:
    """A lookup's G2 prefix plus blocks being fetched from one peer (see the module docstring)."""

    def __init__(self, tier: "ClusterTier", pool: BlockPool, g2_ids: list[int], local: list[int], hashes: list[bytes]):
        self.tier = tier
        self.pool = pool
        self.g2_ids = g2_ids
        self.local = local
        self.hashes = hashes
        self.future: concurrent.futures.Future | None = None
        self._pins = list(g2_ids)
        self._result: tuple[list[int], list[int]] | None = None
        if self._pins:
            pool.pin(self._pins, 0)

    def result(self) -> tuple[list[int], list[int]]:
        if self._result is None:
            self._result = self._settle()
        return self._result

    def _settle(self) -> tuple[list[int], list[int]]:
        try:
            got: FetchResult = self.future.result(timeout=0)
        except Exception as e:  # a failure before the read began: the blocks were never written to
            log.warning("cluster fetch failed: %s", e)
            got = FetchResult(error=str(e))
        pool, ok = self.pool, got.ok
        if ok:
            pool.commit(self.local[:ok], got.checksums[:ok], 0)
        rest = self.local[ok:]
        if rest:
            pool.free(rest)
        self.tier.hit_blocks[pool.pool_id] += ok
        self.tier.counters["remote_miss_blocks"] += len(rest)
        return self.g2_ids + self.local[:ok], [p.Tier.CPU] * len(self.g2_ids) + [p.Tier.CLUSTER] * ok

    def release(self) -> None:
        if self._pins:
            self.pool.unpin(self._pins)
            self._pins = []


class ClusterTier(Tier):
    name = "g4"

    def __init__(self, config: ServiceConfig, *, leases: LeaseTable, node: ClusterNode, endpoint: PeerEndpoint):
        self.config = config
        self._leases = leases
        self.node = node
        self.endpoint = endpoint
        self.counters = node.counters
        self.hit_blocks: Counter = Counter()  # pool id -> blocks read from other nodes (Prometheus, tier 4)
        self._segments: dict[int, str] = {}  # pool id -> segment id registered with NIXL
        self._pools: dict[str, BlockPool] = {}  # fingerprint -> pool, every pool attached

    @classmethod
    def open(cls, config: ServiceConfig, *, instance_id: str, leases: LeaseTable,
             endpoint: PeerEndpoint) -> "ClusterTier":
        node = ClusterNode(name=config.cluster_node, instance_id=instance_id, etcd=config.cluster_etcd,
                           keys=endpoint.keys, ttl_s=config.cluster_ttl_s,
                           index_blocks=config.cluster_index_blocks, control=endpoint.control, events=endpoint.events)
        log.info("cluster: node %s, control %s, events %s, etcd %s", config.cluster_node, endpoint.control,
                 endpoint.events, ",".join(config.cluster_etcd))
        return cls(config, leases=leases, node=node, endpoint=endpoint)

    # ------------------------------------------------------------ hooks

    def attach(self, pool: BlockPool, namespace: Namespace) -> None:
        seg = pool.segment
        self._segments[pool.pool_id] = seg.segment_id
        self._pools[pool.fingerprint] = pool
        self.node.register(seg.segment_id, seg.name)
        self.node.set_fingerprints(sorted(self._pools))

    def prepare_load(self, pool: BlockPool, hashes: list[bytes], g2_ids: list[int]) -> RemoteStaging | None:
        rest = hashes[len(g2_ids):len(g2_ids) + p.MAX_PEER_BLOCKS]
        node, n = self.node.index.run_on(pool.fingerprint, rest)
        if not n or pool.segment.segment_id not in self._segments.values() or not self.node.registered(
                pool.segment.segment_id):
            return None
        staging = RemoteStaging(self, pool, g2_ids, [], rest[:n])  # pins the G2 prefix before allocating
        ids = pool.allocate_staging(rest[:n])
        k = next((i for i, b in enumerate(ids) if b < 0), len(ids))
        if ids[k:]:
            pool.free([b for b in ids[k:] if b >= 0])
        if not k:
            staging.release()
            return None
        staging.local = ids[:k]
        deadline = time.monotonic() + self.config.cluster_deadline_ms / 1000
        staging.future = self.node.fetch(node, pool.fingerprint, rest[:k], pool.segment.segment_id, ids[:k],
                                         [pool.segment.block(b) for b in ids[:k]], deadline)
        self.counters["remote_lookups"] += 1
        return staging

    def handlers(self) -> dict:
        return {p.PeerPin: self._peer_pin, p.PeerContents: self._peer_contents}

    def hits(self, pool_id: int) -> int:
        return self.hit_blocks.get(pool_id, 0)

    def stats(self) -> dict:
        sizes = self.node.index.sizes()
        members = {name: {"state": "up", "control": rec.control, "index_blocks": sizes.get(name, 0),
                          "fingerprints": len(rec.fingerprints)} for name, rec in self.node.members.items()}
        return {"tiers": {self.name: {"node": self.node.name, "etcd": "reachable" if self.node.reachable else "unreachable",
                "control": self.endpoint.control, "events": self.endpoint.events, "nodes": members,
                "registered_pools": sum(map(self.node.registered, self._segments.values())),
                "index_blocks": len(self.node.index), "index_dropped": self.node.index.dropped,
                "agent_restarts": self.node.agent_restarts, "refused_requests": self.endpoint.refused,
                "counters": dict(self.counters)}}}

    def metric_families(self, counter_family: type, gauge_family: type):
        tier = self.name
        c = self.counters
        nodes = gauge_family("kvbm_cluster_nodes", "Other nodes of the cluster this node sees", labels=["tier"])
        nodes.add_metric([tier], len(self.node.members))
        index = gauge_family("kvbm_cluster_index_blocks", "Blocks other nodes hold, as this node's index knows them",
                      labels=["tier"])
        index.add_metric([tier], len(self.node.index))
        nbytes = counter_family("kvbm_cluster_bytes", "Block bytes read from other nodes, and served to them",
                         labels=["tier", "direction"])
        nbytes.add_metric([tier, "read"], c.get("remote_hit_bytes", 0))
        nbytes.add_metric([tier, "served"], c.get("served_bytes", 0))
        failures = counter_family("kvbm_cluster_failures", "Remote fetches that failed, by kind", labels=["tier", "kind"])
        for kind in ("fetch_errors", "read_failures", "checksum_failures", "fetch_timeouts", "resync_errors"):
            failures.add_metric([tier, kind.removesuffix("s")], c.get(kind, 0))
        yield from (nodes, index, nbytes, failures)

    def close(self) -> None:
        """Before the pools go: this node leaves etcd, and its NIXL agent process stops."""
        self.node.close()

    # ------------------------------------------------------------ peers' requests

    def _peer_pool(self, fingerprint: str) -> BlockPool | None:
        return self._pools.get(fingerprint)

    def _peer_pin(self, m: p.PeerPin) -> p.Reply:
        lease = self._leases.get(m.lease)
        pool = self._peer_pool(m.fingerprint)
        md, version = self.node.metadata
        if pool is None or not self.node.registered(pool.segment.segment_id):
            return p.PeerPinReply(req=m.req, pool_id=-1, block_ids=[], checksums=[], block_bytes=0, data_address=0,
                                  block_stride=0, metadata_version=version)
        ids = pool.lookup(m.hashes)
        if ids:
            lease.pin(pool, m.req, ids)
        self.counters["served_blocks"] += len(ids)
        self.counters["served_bytes"] += len(ids) * pool.segment.block_bytes
        return p.PeerPinReply(req=m.req, pool_id=pool.pool_id, block_ids=ids,
                              checksums=pool.checksum_of(ids).tolist() if ids else [],
                              block_bytes=pool.segment.block_bytes,
                              data_address=self.node.address(pool.segment.segment_id),
                              block_stride=pool.segment.block_stride, metadata_version=version,
                              metadata=md if m.metadata_version != version else b"")

    def _peer_contents(self, m: p.PeerContents) -> p.Reply:
        self._leases.get(m.lease)
        start = max(0, m.cursor)
        entries, seen, taken = [], 0, 0
        for pool in sorted(self._pools.values(), key=lambda q: q.pool_id):
            registered = pool.registered()
            n = len(registered)
            if seen + n > start and taken < p.PEER_CONTENTS_PAGE:
                skip = max(0, start - seen)
                hashes = [h for h, _ in registered[skip:skip + p.PEER_CONTENTS_PAGE - taken]]
                entries.append(p.PeerBlocks(fingerprint=pool.fingerprint, tier=p.Tier.CPU, hashes=hashes))
                taken += len(hashes)
            seen += n
        end = start + taken
        return p.PeerContentsReply(req=m.req, entries=entries, next_cursor=end if end < seen else 0)
