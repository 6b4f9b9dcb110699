"""This node's part of a cluster: two threads beside the coordinator's loop.

- The membership thread keeps this node's etcd key (`membership`), follows the other nodes' keys,
  subscribes to each peer's KV event stream (TCP, CURVE) and feeds `index` (a `RemoteIndex`). A
  batch whose `seq` does not follow the last one, or that comes from a new `instance_id`, means
  events were missed: the node's entries are dropped and rebuilt by a resync (`PeerContents`
  pages), which also runs when a peer joins and at its first batch. A node whose key goes (its
  lease expired, or it left) is dropped: index entries, subscription, link, NIXL peer.
- The transfer thread owns the NIXL agent process (`agent`: this node's NIXL agent, which maps
  and registers our pools, serves peers' reads and runs ours, out of this process) and the links
  to peers (`peers`): it registers pools, runs resyncs, and runs fetches one at a time.

`fetch(node, fingerprint, hashes, segment_key, local_ids, local_blocks, deadline)` returns a future
of a `FetchResult`: the peer pins the longest prefix it holds in G2 (`PeerPin`), NIXL READs of
scattered descriptors move those blocks into our blocks `local_ids` of the registered segment
`segment_key` (`local_blocks`: their numpy views here, owned by the caller until the future is
done), every block is checksummed against what the peer recorded, and the future is set: `ok`
blocks verified (a prefix), their checksums, checked over `VERIFY_THREADS` threads (reading in
chunks to verify one while the next is read measured slower: each NIXL READ costs milliseconds to
set up). The peer's pins are released after the future is set. A fetch that
cannot finish by `deadline` (peer unreachable, killed mid-read, pin refused, too slow) ends with
`ok` = 0 or a shorter verified prefix, never later than the deadline plus the agent process's grace
(an agent process that overruns is killed, so nothing lands in the blocks afterwards). Fetches
queue behind each other; one that reaches the front after its deadline ends at once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections import Counter

import zmq

from .. import protocol as p
from ..errors import KvbmError
from ..kernels import cpu_copy
from .agent import AgentProcess
from .etcd import EtcdClient
from .index import RemoteIndex
from .keys import ClusterKeys, secure_client
from .membership import Membership, NodeRecord
from .peers import PeerError, PeerLink

log = logging.getLogger(__name__)

_TICK_MS = 50  # membership thread: longest wait between two looks at etcd and the subscriptions
VERIFY_THREADS = 2  # checksumming 1 GiB on one thread cost a third of reading it
_RELEASE_S = 0.5  # a Release after the fetch gets this long; past it the pins lapse with our lease


@dataclasses.dataclass
class FetchResult:
    ok: int = 0
    checksums: list[int] = dataclasses.field(default_factory=list)
    error: str = ""


@dataclasses.dataclass(eq=False)
class _Sub:
    record: NodeRecord
    sock: zmq.Socket
    instance_id: str = ""
    seq: int | None = None


class ClusterNode:
    def __init__(self, *, name: str, instance_id: str, etcd: list[str], keys: ClusterKeys, ttl_s: int,
                 index_blocks: int, control: str, events: str):
        self.name = name
        self.instance_id = instance_id
        self.keys = keys
        self.control = control
        self.events = events
        self.index = RemoteIndex(index_blocks)
        self.counters: Counter = Counter()
        self.members: dict[str, NodeRecord] = {}  # the other nodes, as etcd last said
        self.metadata = (b"", -1)  # our NIXL metadata and its version, once the agent process runs
        self._registered: set[str] = set()
        self._addresses: dict[str, int] = {}
        self._fingerprints: list[str] = []
        self._ctx = zmq.Context()
        self._membership = Membership(EtcdClient(etcd), name, ttl_s)
        self._stop = threading.Event()
        self._xfer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvbm-cluster-xfer")
        self._agent = AgentProcess(name)
        self._links: dict[str, PeerLink] = {}
        self._agents: dict[str, tuple[str, int]] = {}  # node -> (NIXL agent name, metadata version)
        self._xfer.submit(self._start_agent)
        self._thread = threading.Thread(target=self._run, name="kvbm-cluster-members", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ called from the coordinator's loop

    def register(self, key: str, segment: str) -> None:
        self._xfer.submit(self._register, key, segment)

    def deregister(self, key: object) -> concurrent.futures.Future:
        return self._xfer.submit(self._deregister, key)

    def registered(self, key: str) -> bool:
        return key in self._registered

    def address(self, key: str) -> int:
        """Where the registered segment `key`'s block 0 is in the agent process (what peers read)."""
        return self._addresses.get(key, 0)

    def set_fingerprints(self, fingerprints: list[str]) -> None:
        self._fingerprints = sorted(fingerprints)

    def fetch(self, node: str, fingerprint: str, hashes: list[bytes], segment_key: str, local_ids: list[int],
              local_blocks: list, deadline: float) -> concurrent.futures.Future:
        return self._xfer.submit(self._fetch, node, fingerprint, hashes, segment_key, local_ids, local_blocks,
                                 deadline)

    @property
    def agent_restarts(self) -> int:
        return self._agent.restarts

    @property
    def reachable(self) -> bool:
        return self._membership.reachable

    def close(self) -> None:
        """Leave etcd and stop the agent process (a call in flight on the transfer thread ends at once)."""
        self._stop.set()
        self._thread.join(10)
        self._agent.terminate()
        self._xfer.shutdown(wait=True, cancel_futures=True)
        for link in self._links.values():
            link.close()
        self._agent.close()
        self._ctx.term()

    # ------------------------------------------------------------ membership thread

    def _record(self) -> NodeRecord | None:
        md, version = self.metadata
        if version < 0:
            return None
        return NodeRecord(name=self.name, instance_id=self.instance_id, agent=self._agent.agent, metadata=md,
                          metadata_version=version, control=self.control, events=self.events,
                          fingerprints=list(self._fingerprints))

    def _run(self) -> None:
        subs: dict[str, _Sub] = {}
        poller = zmq.Poller()
        try:
            while not self._stop.is_set():
                if not subs:  # zmq's poll returns at once when it has nothing to poll
                    self._stop.wait(_TICK_MS / 1000)
                ready = dict(poller.poll(_TICK_MS)) if subs else {}
                for node, sub in list(subs.items()):
                    if sub.sock in ready:
                        self._drain(node, sub)
                self._membership.record = self._record()
                members = self._membership.step(time.monotonic())
                if members is not None:
                    self._update_members(members, subs, poller)
        except Exception:  # the cluster thread must never die silently: log, and leave the index empty
            log.exception("cluster membership thread failed")
        finally:
            for sub in subs.values():
                sub.sock.close(0)
            self._membership.leave()

    def _update_members(self, members: dict[str, NodeRecord], subs: dict[str, _Sub], poller: zmq.Poller) -> None:
        for node in list(subs):
            rec = members.get(node)
            known = subs[node].record
            if rec is None or rec.instance_id != known.instance_id or rec.events != known.events:
                self._leave(node, subs.pop(node), poller, "left the cluster" if rec is None else "restarted")
        for node, rec in members.items():
            if node not in subs:
                sock = self._ctx.socket(zmq.SUB)
                sock.linger = 0
                sock.setsockopt(zmq.MAXMSGSIZE, 64 << 20)
                secure_client(sock, self.keys)
                sock.setsockopt(zmq.SUBSCRIBE, p.EVENTS_TOPIC)
                sock.connect(rec.events)
                subs[node] = _Sub(rec, sock, rec.instance_id)
                poller.register(sock, zmq.POLLIN)
                log.info("cluster: node %s is up (%s)", node, rec.control)
                self._resync(node)
            subs[node].record = rec
        self.members = dict(members)

    def _leave(self, node: str, sub: _Sub, poller: zmq.Poller, why: str) -> None:
        poller.unregister(sub.sock)
        sub.sock.close(0)
        n = self.index.drop_node(node)
        self._xfer.submit(self._forget, node)
        log.info("cluster: node %s %s: %d index entries dropped", node, why, n)

    def _drain(self, node: str, sub: _Sub) -> None:
        for _ in range(256):
            try:
                frames = sub.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                batch = p.decode_events(frames)
            except KvbmError as e:
                self.counters["bad_event_batches"] += 1
                log.warning("cluster: node %s sent an undecodable event batch: %s", node, e)
                continue
            first = sub.seq is None
            if batch.instance_id != sub.instance_id or (not first and batch.seq != sub.seq + 1):
                self.counters["event_gaps"] += 1
                log.info("cluster: events of node %s missed (seq %s -> %d, instance %s): resync", node, sub.seq,
                         batch.seq, batch.instance_id[:8])
                sub.instance_id = batch.instance_id
                sub.seq = batch.seq
                self._resync(node)
                continue
            sub.seq = batch.seq
            self.index.apply(node, batch.events)
            if first:  # events before our subscription was up are lost: read what the node holds
                self._resync(node)

    def _resync(self, node: str) -> None:
        self.counters["resyncs"] += 1
        self.index.drop_node(node)
        self._xfer.submit(self._read_contents, node)

    # ------------------------------------------------------------ transfer thread

    def _start_agent(self) -> None:
        try:
            self._agent.start()
        except (KvbmError, TimeoutError) as e:
            log.error("cluster: the NIXL agent process did not start (%s): no remote hits until it does", e)
        self._published()

    def _published(self) -> None:
        """Our NIXL metadata and addresses as peers should see them now (a restarted agent process
        changes both): the addresses first, so that a reply never pairs new metadata with old ones."""
        self._addresses = dict(self._agent.addresses)
        self.metadata = (self._agent.metadata, self._agent.version)

    def _register(self, key: str, segment: str) -> None:
        try:
            self._agent.map(key, segment)
            self._registered.add(key)
        except (KvbmError, TimeoutError) as e:
            log.error("cluster: pool segment %s not registered with NIXL: %s", segment, e)
        self._published()

    def _deregister(self, key: str) -> None:
        self._registered.discard(key)
        self._agent.unmap(key)
        self._published()

    def _forget(self, node: str) -> None:
        link = self._links.pop(node, None)
        if link is not None:
            link.close()
        agent = self._agents.pop(node, None)
        if agent is not None:
            self._agent.remove_peer(agent[0])

    def _link(self, node: str) -> PeerLink:
        rec = self.members.get(node)
        if rec is None:
            raise PeerError(f"node {node} is not a member")
        link = self._links.get(node)
        if link is None or link.endpoint != rec.control:
            if link is not None:
                link.close()
            link = self._links[node] = PeerLink(self._ctx, rec.control, self.keys, f"cluster:{self.name}")
        return link

    def _read_contents(self, node: str) -> None:
        deadline = time.monotonic() + 10.0
        cursor, n = 0, 0
        try:
            link = self._link(node)
            while True:
                reply = link.call(lambda req, lease: p.PeerContents(req=req, lease=lease, cursor=cursor), deadline)
                for entry in reply.entries:
                    self.index.add(node, entry.fingerprint, entry.hashes, entry.tier)
                    n += len(entry.hashes)
                cursor = reply.next_cursor
                if not cursor:
                    break
            log.info("cluster: index of node %s rebuilt: %d blocks", node, n)
        except KvbmError as e:
            self.counters["resync_errors"] += 1
            log.warning("cluster: resync of node %s failed: %s", node, e)

    def _fetch(self, node: str, fingerprint: str, hashes: list[bytes], segment_key: str, local_ids: list[int],
               local_blocks: list, deadline: float) -> FetchResult:
        self.counters["fetches"] += 1
        if time.monotonic() >= deadline:
            self.counters["fetch_timeouts"] += 1
            return FetchResult(error="deadline passed before the fetch started")
        agent, version = self._agents.get(node, ("", -1))
        t0 = time.monotonic()
        try:
            link = self._link(node)
            pin = link.call(lambda req, lease: p.PeerPin(req=req, lease=lease, fingerprint=fingerprint,
                                                         hashes=hashes, metadata_version=version), deadline)
        except KvbmError as e:
            self.counters["fetch_errors"] += 1
            log.warning("cluster: pin of %d block(s) on node %s failed: %s", len(hashes), node, e)
            return FetchResult(error=str(e))
        n = min(len(pin.block_ids), len(hashes), len(pin.checksums))
        result = FetchResult()
        try:
            if not n:
                self.counters["remote_misses"] += 1
                return result
            nbytes = len(local_blocks[0])
            if pin.block_bytes != nbytes or pin.block_stride < nbytes:
                raise PeerError(f"node {node} has blocks of {pin.block_bytes} bytes, ours are {nbytes}")
            if pin.metadata or not self._agent.knows(agent):
                if not pin.metadata:
                    raise PeerError(f"node {node} sent no NIXL metadata")
                if agent:
                    self._agent.remove_peer(agent)
                agent = self._agent.add_peer(pin.metadata)
                self._agents[node] = (agent, pin.metadata_version)
            remote = [pin.data_address + b * pin.block_stride for b in pin.block_ids[:n]]
            t1 = time.monotonic()
            ok, state = self._read_verified(agent, segment_key, local_ids[:n], remote, local_blocks[:n],
                                            pin.checksums[:n], deadline)
            log.debug("cluster: %d block(s) from node %s: pin %.2f ms, read %s, %d verified in %.2f ms", n, node,
                      (t1 - t0) * 1000, state, ok, (time.monotonic() - t1) * 1000)
            if state == "failed":
                self.counters["read_failures"] += 1
                result.error = f"NIXL read from node {node} failed"
            elif state == "bad checksum":
                self.counters["checksum_failures"] += 1
                log.warning("cluster: a block read from node %s fails its checksum: the prefix ends there", node)
            result.ok, result.checksums = ok, list(pin.checksums[:ok])
            self.counters["remote_hit_blocks"] += ok
            self.counters["remote_hit_bytes"] += ok * nbytes
            return result
        except (KvbmError, TimeoutError) as e:
            self.counters["fetch_errors"] += 1
            result.error = str(e)
            log.warning("cluster: fetch from node %s failed: %s", node, e)
            return result
        finally:
            if n:
                self._xfer.submit(self._release, node, pin.pool_id, pin.block_ids[:n])

    def _read_verified(self, agent: str, segment_key: str, local_ids: list[int], remote: list[int],
                       blocks: list, checksums: list[int], deadline: float) -> tuple[int, str]:
        """One NIXL READ of the blocks, then every block's checksum (over `VERIFY_THREADS` threads).
        Returns how many blocks from the first verified, and `done`, `failed` (nothing counts) or
        `bad checksum` (the prefix ends at that block). Nothing lands in the blocks afterwards."""
        self.counters["reads"] += 1
        if self._agent.read(agent, segment_key, local_ids, remote, len(blocks[0]), deadline) != "done":
            self._published()  # a read that overran restarted the agent process
            return 0, "failed"
        got = cpu_copy.checksums(blocks, VERIFY_THREADS)
        ok = next((i for i, (a, b) in enumerate(zip(got, checksums)) if a != b), len(blocks))
        return ok, "done" if ok == len(blocks) else "bad checksum"

    def _release(self, node: str, pool_id: int, block_ids: list[int]) -> None:
        try:
            self._link(node).call(lambda req, lease: p.Release(req=req, lease=lease, pool_id=pool_id,
                                                               block_ids=block_ids), time.monotonic() + _RELEASE_S)
        except KvbmError as e:  # the link dropped its lease: the pins lapse with it on the peer
            log.info("cluster: release of %d pin(s) on node %s failed (%s): they lapse with the lease",
                     len(block_ids), node, e)
