"""The cluster tier (G4) end to end: real etcd, real coordinators as separate nodes, NIXL reads
over UCX/TCP on loopback, and this test process as the engine on each node (numpy KV tensors,
the client library).

Stories: a block stored on node A is a hit on node B with the same bytes (tiers 4, then 2);
A killed mid-read is a miss within the deadline; A's lease expiring drops its entries from B's
index; etcd down then back; a block whose bytes on A no longer match its checksum is a miss on
B; a client without the cluster secret gets nothing from the TCP endpoint.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import zmq

from kvbm_shm import Client, EngineLayout, KvLayout, Namespace, protocol as p, sequence_hashes
from kvbm_shm.cluster.keys import ClusterKeys, secure_client
from kvbm_shm.errors import ErrorCode
from kvbm_shm.shm import PoolSegment

from ..procs import free_port, wait_for

LAYERS, HEADS, PAGE, HEAD_DIM, DEVICE_BLOCKS = 2, 2, 16, 32, 64
HASHES = sequence_hashes(list(range(DEVICE_BLOCKS * PAGE)), PAGE)


class Engine:
    """An engine on one node: KV tensors whose device block i holds the block of HASHES[i]."""

    def __init__(self, node, seed: int = 0, pool_blocks: int = 128):
        rng = np.random.default_rng(seed)
        shape = (DEVICE_BLOCKS, HEADS, PAGE, 2 * HEAD_DIM)
        self.kv = [rng.standard_normal(shape, dtype=np.float32) for _ in range(LAYERS)]
        self.namespace = Namespace("cluster-test", KvLayout(LAYERS, 2, PAGE, HEADS * HEAD_DIM, "float32"),
                                   EngineLayout.of(self.kv))
        self.client = Client(instance=node.instance, runtime_dir=node.runtime_dir, name="engine", timeout_s=20)
        cache_bytes = PoolSegment.size_for(pool_blocks, self.namespace.kv.block_bytes) + 4096
        self.pool = self.client.register_layout(self.namespace, cache_bytes)
        self.bound = self.pool.bind(self.kv)

    def store(self, first: int, count: int):
        ids = list(range(first, first + count))
        return self.client.store(self.bound, [HASHES[i] for i in ids], ids)

    def load(self, first: int, count: int):
        """Load into fresh tensors; returns the result and whether every loaded block is identical."""
        out = [np.zeros_like(t) for t in self.kv]
        ids = list(range(first, first + count))
        result = self.client.load(self.pool.bind(out), [HASHES[i] for i in ids], ids)
        same = all(np.array_equal(out[layer][b], self.kv[layer][b])
                   for layer in range(LAYERS) for b in ids[:result.loaded])
        return result, same

    def g4(self) -> dict:
        return self.client.stats().tiers["g4"]

    def close(self) -> None:
        self.client.close()


def agent_pid(node) -> int:
    """The pid of a node's NIXL agent process (a child of its coordinator)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == node.proc.pid and b"kvbm_shm.cluster.agent" in cmdline:
            return int(stat.parent.name)
    raise AssertionError(f"no NIXL agent process under coordinator {node.proc.pid}")


def wait_registered(*engines: Engine, timeout_s: float = 30) -> None:
    """Every engine's node has registered its pool with NIXL (the serving side's and the reader's)."""
    for e in engines:
        wait_for(lambda: e.g4()["registered_pools"] == 1, timeout_s, "a pool registered with NIXL")


def wait_index(engine: Engine, node: str, blocks: int, timeout_s: float = 20) -> dict:
    return wait_for(lambda: engine.g4()["nodes"].get(node, {}).get("index_blocks") == blocks and engine.g4(),
                    timeout_s, f"{blocks} blocks of node {node} in the remote index")


def remote_hit(cluster, blocks: int, *b_args: str) -> tuple:
    """Nodes A and B (`b_args`: more serve flags of B): an engine on A stores `blocks` blocks, an
    engine on B loads them from A (tiers 4, A's exact bytes). Returns (a, b, engine a, engine b)."""
    a, b = cluster.start("a"), cluster.start("b", *b_args)
    ea = Engine(a)
    assert ea.store(0, blocks).stored == blocks
    eb = Engine(b)  # the same tensors, never stored on B: loads into zeroed ones compare with them
    wait_index(eb, "a", blocks)
    wait_registered(ea, eb)
    result, same = eb.load(0, blocks)
    assert (result.loaded, result.tiers, same) == (blocks, [p.Tier.CLUSTER] * blocks, True)
    return a, b, ea, eb


def scrape(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_stores_b_hits_with_the_same_bytes(cluster):
    metrics_port = free_port()
    a, b, ea, eb = remote_hit(cluster, 16, "--metrics-port", str(metrics_port))
    result, same = eb.load(0, 16)
    assert (result.loaded, result.tiers, same) == (16, [p.Tier.CPU] * 16, True)
    g4 = eb.g4()
    assert g4["counters"]["remote_hit_blocks"] == 16
    assert g4["counters"]["remote_hit_bytes"] == 16 * ea.namespace.kv.block_bytes
    assert ea.g4()["counters"]["served_blocks"] == 16
    pool = (("model", "cluster-test"), ("pool", str(eb.pool.pool_id)))
    # the second load was answered from B's hash index: its hits arrive with the client's usage report
    samples = wait_for(lambda: (s := scrape(metrics_port))["kvbm_hit_blocks_total", (*pool, ("tier", "g2"))] == 16
                       and s, 10, "the second load's G2 hits reported")
    assert samples["kvbm_hit_blocks_total", (*pool, ("tier", "g4"))] == 16
    read = samples["kvbm_cluster_bytes_total", (("direction", "read"), ("tier", "g4"))]
    assert read == 16 * ea.namespace.kv.block_bytes
    assert samples["kvbm_cluster_nodes", (("tier", "g4"),)] == 1
    ea.close(), eb.close()


def test_three_nodes_a_block_travels_on_after_its_first_node_leaves(cluster):
    a, b, ea, eb = remote_hit(cluster, 8)
    ea.close()
    started = time.monotonic()
    a.stop()  # a clean stop leaves etcd at once, not after its lease
    assert b"/kvbm-shm/nodes/a" not in cluster.etcd.keys()
    assert time.monotonic() - started < 10
    c = cluster.start("c")
    ec = Engine(c)
    wait_index(ec, "b", 8)  # C joined after B stored them: it learnt them by a resync, not by events
    assert "a" not in ec.g4()["nodes"]
    wait_registered(eb, ec)
    result, same = ec.load(0, 8)
    assert (result.loaded, result.tiers, same) == (8, [p.Tier.CLUSTER] * 8, True)
    eb.close(), ec.close()


BIG_BLOCKS = 256  # of 1 MiB: a read of them all takes a while even on loopback
BIG_HASHES = sequence_hashes(list(range(BIG_BLOCKS * PAGE)), PAGE)


class BigEngine(Engine):
    def __init__(self, node):
        rng = np.random.default_rng(7)
        self.kv = [rng.standard_normal((BIG_BLOCKS, 8, PAGE, 256), dtype=np.float32) for _ in range(8)]
        self.namespace = Namespace("cluster-big", KvLayout(8, 2, PAGE, 8 * 128, "float32"), EngineLayout.of(self.kv))
        self.client = Client(instance=node.instance, runtime_dir=node.runtime_dir, name="engine", timeout_s=20)
        cache_bytes = PoolSegment.size_for(BIG_BLOCKS + 8, self.namespace.kv.block_bytes) + 4096
        self.pool = self.client.register_layout(self.namespace, cache_bytes)
        self.bound = self.pool.bind(self.kv)

    def store_all(self):
        return self.client.store(self.bound, BIG_HASHES, list(range(BIG_BLOCKS)))

    def load_all(self):
        """Load into fresh tensors: the result, whether the bytes are A's, and how long the load took."""
        out = self.pool.bind([np.zeros_like(t) for t in self.kv])
        started = time.monotonic()
        result = self.client.load(out, BIG_HASHES, list(range(BIG_BLOCKS)))
        took = time.monotonic() - started
        same = all(np.array_equal(o[:result.loaded], t[:result.loaded]) for o, t in zip(out.tensors, self.kv))
        return result, same, took


def test_a_killed_mid_read_is_a_miss_within_the_deadline(cluster):
    deadline_ms = 3000
    a = cluster.start("a", cpu_cache_gb=0.3)
    b = cluster.start("b", cpu_cache_gb=0.3, deadline_ms=deadline_ms)
    ea = BigEngine(a)
    assert ea.store_all().stored == BIG_BLOCKS
    eb = BigEngine(b)
    wait_index(eb, "a", BIG_BLOCKS)
    wait_registered(ea, eb)
    out = {}

    def load():
        out["result"], out["same"], out["took"] = eb.load_all()
        print("load took", out["took"])

    observer = Client(instance=b.instance, runtime_dir=b.runtime_dir, name="observer", timeout_s=20)
    serving = agent_pid(a)
    os.kill(serving, signal.SIGSTOP)  # A's agent serves no byte: the read stays under way until A dies
    t = threading.Thread(target=load)
    t.start()
    wait_for(lambda: observer.stats().tiers["g4"]["counters"].get("reads", 0) >= 1, 30, "B's NIXL read under way")
    a.kill()
    os.kill(serving, signal.SIGKILL)
    t.join(30)
    assert not t.is_alive()
    counters = eb.g4()["counters"]
    assert out["same"]  # whatever was loaded has A's exact bytes
    assert out["took"] < deadline_ms / 1000 + 2.0
    # the read was cut short: a miss, counted as a failed read
    assert (out["result"].loaded, counters.get("read_failures", 0)) == (0, 1)
    # B keeps serving its own blocks
    eb.close(), observer.close()
    e2 = Engine(b)
    assert e2.store(0, 4).stored == 4
    result, same = e2.load(0, 4)
    assert (result.loaded, result.tiers, same) == (4, [p.Tier.CPU] * 4, True)
    e2.close()


def test_a_dead_nodes_lease_expiring_drops_its_index_entries(cluster):
    a, b = cluster.start("a"), cluster.start("b")
    ea = Engine(a)
    assert ea.store(0, 12).stored == 12
    eb = Engine(b)
    wait_index(eb, "a", 12)
    a.kill()
    killed = time.monotonic()
    wait_for(lambda: "a" not in eb.g4()["nodes"] and eb.g4()["index_blocks"] == 0, 15,
             "A's entries dropped from B's index")
    assert time.monotonic() - killed < 2 + 3  # ttl 2 s, plus the poll and a busy machine
    assert b"/kvbm-shm/nodes/a" not in cluster.etcd.keys()
    result, _ = eb.load(0, 12)
    assert result.loaded == 0
    ea.client.close(), eb.close()


def test_etcd_down_then_back(cluster):
    a, b = cluster.start("a"), cluster.start("b")
    ea = Engine(a)
    assert ea.store(0, 8).stored == 8
    eb = Engine(b)
    wait_index(eb, "a", 8)
    wait_registered(ea, eb)
    cluster.etcd.stop()
    wait_for(lambda: eb.g4()["etcd"] == "unreachable", 10, "B to notice etcd is gone")
    # local tiers keep serving, and so do the peers B knew
    assert eb.store(40, 4).stored == 4
    result, same = eb.load(40, 4)
    assert (result.loaded, result.tiers, same) == (4, [p.Tier.CPU] * 4, True)
    result, same = eb.load(0, 8)
    assert (result.loaded, result.tiers, same) == (8, [p.Tier.CLUSTER] * 8, True)
    cluster.etcd.start()
    wait_for(lambda: eb.g4()["etcd"] == "reachable", 20, "B to see etcd again")
    wait_for(lambda: {b"/kvbm-shm/nodes/a", b"/kvbm-shm/nodes/b"} <= set(cluster.etcd.keys()), 20,
             "both nodes in etcd again")
    c = cluster.start("c")
    ec = Engine(c)
    wait_index(ec, "a", 8)
    wait_index(ec, "b", 12)
    ea.close(), eb.close(), ec.close()


def test_a_block_that_fails_its_checksum_on_the_peer_ends_the_prefix(cluster):
    a, b = cluster.start("a"), cluster.start("b")
    ea = Engine(a)
    assert ea.store(0, 10).stored == 10
    seg = PoolSegment.attach(ea.pool.segment.name)
    bad = int(np.flatnonzero(seg.table["hash"] == np.frombuffer(HASHES[6], "V16"))[0])
    seg.block(bad)[100] ^= 0xFF  # A's bytes no longer match the checksum A recorded
    eb = Engine(b)
    wait_index(eb, "a", 10)
    wait_registered(ea, eb)
    result, same = eb.load(0, 10)
    assert (result.loaded, result.tiers, same) == (6, [p.Tier.CLUSTER] * 6, True)
    assert eb.g4()["counters"]["checksum_failures"] == 1
    # the failed block was freed on B: nothing past the verified prefix is registered there
    result, same = eb.load(0, 10)
    assert result.loaded == 6
    del seg.table
    seg.close()
    ea.close(), eb.close()


def test_the_tcp_endpoint_answers_only_holders_of_the_secret(cluster):
    a = cluster.start("a")
    ea = Engine(a)
    control = ea.g4()["control"]
    good = ClusterKeys.from_file(str(cluster.secret))
    wrong = ClusterKeys.from_secret(b"x" * 64)
    ctx = zmq.Context()

    def ask(keys, msg) -> p.Reply | None:
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        if keys is not None:
            secure_client(s, keys)
        s.connect(control)
        s.send_multipart(p.encode(msg))
        got = p.decode_reply(s.recv_multipart()) if s.poll(1500) else None
        s.close()
        return got

    hello = p.Hello(req=1, name="intruder", pid=1)
    assert ask(None, hello) is None  # plain TCP: no CURVE handshake, nothing answered
    assert ask(wrong, hello) is None  # another secret: the handshake fails
    assert ask(dataclasses.replace(wrong, server_public=good.server_public), hello) is None  # ZAP refuses the key
    reply = ask(good, hello)
    assert isinstance(reply, p.HelloReply)
    refused = ask(good, p.Stats(req=2))
    assert isinstance(refused, p.ErrorReply) and refused.code == ErrorCode.UNKNOWN_OP
    assert ea.g4()["refused_requests"] == 1
    ctx.term()
    ea.close()


def test_a_stalled_peer_is_a_miss_within_the_deadline(cluster):
    deadline_ms = 1500
    a, b = cluster.start("a"), cluster.start("b", deadline_ms=deadline_ms)
    ea = Engine(a)
    assert ea.store(0, 8).stored == 8
    eb = Engine(b)
    wait_index(eb, "a", 8)
    wait_registered(ea, eb)
    a.proc.send_signal(signal.SIGSTOP)  # alive but silent: the pin request is never answered
    try:
        started = time.monotonic()
        result, _ = eb.load(0, 8)
        took = time.monotonic() - started
    finally:
        a.proc.send_signal(signal.SIGCONT)
    assert result.loaded == 0
    assert deadline_ms / 1000 - 0.1 < took < deadline_ms / 1000 + 1.5
    assert eb.g4()["counters"]["fetch_errors"] == 1
    # A answers again: the next lookup is a hit (a new lease; the old one's pins lapsed on A)
    result, same = eb.load(0, 8)
    assert (result.loaded, result.tiers, same) == (8, [p.Tier.CLUSTER] * 8, True)
    ea.close(), eb.close()


def test_ls_top_and_inspect_show_the_cluster(cluster):
    a, b, ea, eb = remote_hit(cluster, 4)
    out = subprocess.run([sys.executable, "-m", "kvbm_shm", "top", b.instance, "--runtime-dir", str(b.runtime_dir),
                          "--iterations", "1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (f"cluster node b (etcd reachable), peers a, index 4 blocks, remote hits 4 blocks "
            f"({4 * ea.namespace.kv.block_bytes / 1024:.1f} KiB") in out.stdout, out.stdout
    out = subprocess.run([sys.executable, "-m", "kvbm_shm", "inspect", b.instance, "--runtime-dir",
                          str(b.runtime_dir)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "cluster: node b, etcd reachable" in out.stdout, out.stdout
    assert f"remote hits 4 blocks ({4 * ea.namespace.kv.block_bytes / 1024:.1f} KiB)" in out.stdout, out.stdout
    row = next(line.split() for line in out.stdout.splitlines() if line.split()[:1] == ["a"])
    assert row[:3] == ["a", "up", "4"], out.stdout
    out = subprocess.run([sys.executable, "-m", "kvbm_shm", "ls", "--runtime-dir", str(b.runtime_dir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    row = next(line.split() for line in out.stdout.splitlines() if line.split()[:1] == [b.instance])
    assert f"b@{cluster.etcd.url}" in row, out.stdout
    ea.close(), eb.close()


def test_a_restarted_peer_is_resynced(cluster):
    a, b = cluster.start("a"), cluster.start("b")
    ea = Engine(a)
    assert ea.store(0, 6).stored == 6
    ea.client.close()
    eb = Engine(b)
    wait_index(eb, "a", 6)
    resyncs = eb.g4()["counters"]["resyncs"]
    a.kill()  # SIGKILL: the next coordinator of the instance adopts the pool it left
    a.start(timeout_s=60)
    # a new instance_id under the same node name: B drops what it knew and reads A's contents again
    wait_for(lambda: eb.g4()["counters"]["resyncs"] > resyncs and eb.g4()["nodes"].get("a", {}).get(
        "index_blocks") == 6, 30, "B's index of A rebuilt after A's restart")
    wait_for(lambda: eb.g4()["registered_pools"] == 1, 20, "B's pool registered with NIXL")
    with Client(instance=a.instance, runtime_dir=a.runtime_dir, name="observer", timeout_s=20) as observer:
        wait_for(lambda: observer.stats().tiers["g4"]["registered_pools"] == 1, 30, "A's adopted pool registered")
    result, same = eb.load(0, 6)
    assert (result.loaded, result.tiers, same) == (6, [p.Tier.CLUSTER] * 6, True)
    eb.close()
