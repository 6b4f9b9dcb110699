"""Membership of a cluster in etcd: one key per node under a lease the node keeps alive.

    /kvbm-shm/nodes/<node name>  ->  NodeRecord as JSON, attached to the node's lease

`Membership.step(now)` does what is due: grant a lease and put the record (at start, after the
lease was lost, e.g. etcd restarted empty or the node was cut off longer than its TTL, and whenever
the record changed), keep the lease alive every ttl/3, and read every node's key every `poll_s`.
It returns the other nodes' records when it read them, None otherwise. A node whose process dies
leaves when its lease expires (ttl); `leave()` revokes the lease, so a clean stop leaves at once.
When etcd does not answer, the last known members stay (the cluster keeps serving on what it
knew) and the failure is logged at most every `_LOG_EVERY_S`. Blocking calls: runs on the cluster's
membership thread.
"""

from __future__ import annotations

import logging

import msgspec

from .etcd import EtcdClient, EtcdUnavailable

log = logging.getLogger(__name__)

PREFIX = b"/kvbm-shm/nodes/"
_LOG_EVERY_S = 10.0


class NodeRecord(msgspec.Struct):
    name: str
    instance_id: str  # new on every coordinator start
    agent: str  # NIXL agent name
    metadata: bytes  # NIXL agent metadata
    metadata_version: int
    control: str  # tcp:// endpoint of the cluster ROUTER (CURVE)
    events: str  # tcp:// endpoint of the cluster PUB (CURVE)
    fingerprints: list[str]  # namespaces of this node's pools


_decoder = msgspec.json.Decoder(NodeRecord)


class Membership:
    def __init__(self, etcd: EtcdClient, name: str, ttl_s: int, poll_s: float = 0.25):
        self.etcd = etcd
        self.name = name
        self.key = PREFIX + name.encode()
        self.ttl_s = ttl_s
        self.poll_s = poll_s
        self.lease = 0
        self.record: NodeRecord | None = None
        self.reachable = False
        self._put = b""  # the value etcd holds for us
        self._next_keepalive = 0.0
        self._next_poll = 0.0
        self._next_log = 0.0

    def step(self, now: float) -> dict[str, NodeRecord] | None:
        try:
            self._keep(now)
            if now < self._next_poll:
                return None
            self._next_poll = now + self.poll_s
            members = {}
            for key, value in self.etcd.get_prefix(PREFIX).items():
                try:
                    rec = _decoder.decode(value)
                except msgspec.DecodeError as e:
                    log.warning("ignoring etcd key %r: not a node record (%s)", key, e)
                    continue
                if rec.name != self.name and key == PREFIX + rec.name.encode():
                    members[rec.name] = rec
            self._up()
            return members
        except EtcdUnavailable as e:
            self.reachable = False
            if now >= self._next_log:
                log.warning("cluster membership: %s (serving on the members last known; retrying)", e)
                self._next_log = now + _LOG_EVERY_S
            self._next_poll = now + self.poll_s
            return None

    def _keep(self, now: float) -> None:
        if self.record is None:
            return
        value = msgspec.json.encode(self.record)
        if self.lease and now >= self._next_keepalive:
            if not self.etcd.keepalive(self.lease):
                log.warning("cluster membership: etcd lost the lease of node %s; joining again", self.name)
                self.lease = 0
            self._next_keepalive = now + self.ttl_s / 3
        if not self.lease:
            self.lease = self.etcd.grant(self.ttl_s)
            self._put = b""
            self._next_keepalive = now + self.ttl_s / 3
        if value != self._put:
            self.etcd.put(self.key, value, self.lease)
            if not self._put:
                log.info("cluster: node %s joined (etcd lease %x, ttl %d s)", self.name, self.lease, self.ttl_s)
            self._put = value

    def _up(self) -> None:
        if not self.reachable:
            self.reachable = True
            self._next_log = 0.0

    def leave(self) -> None:
        """Remove our key now (clean stop)."""
        if self.lease:
            try:
                self.etcd.revoke(self.lease)
            except EtcdUnavailable as e:
                log.warning("cluster: could not leave at once (%s): the key goes when its lease expires", e)
            self.lease = 0
