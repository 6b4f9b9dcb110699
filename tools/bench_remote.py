"""Benchmark: remote hits of the cluster tier (G4) against raw NIXL and raw ZeroMQ, in one run.

Starts etcd and two coordinators on this machine as nodes A and B of one cluster (UCX transports
as the environment says: by default UCX picks, cma on one host; `--ucx-tls tcp` forces TCP on
loopback). An engine on A stores `--gib` GiB of 2 MiB blocks and `--latency-lookups` one-block
prefixes of 16 KiB blocks; an engine on B then looks them up, so every lookup is a remote hit.

- Bandwidth: one lookup on B of all the 2 MiB blocks (pin on A, NIXL READs of scattered
  descriptors into B's G2, every checksum verified, registered in B's G2; B's pool is cleared
  before each, so each is a remote hit), against a raw NIXL READ of the same descriptors (A's
  blocks into the same B pool blocks, A's agent serving both times) by a fresh agent in this
  process; each best of `--repeats`:
      ratio_vs_limit = remote hit GB/s / raw NIXL READ GB/s (the bests; the firsts are shown too)
- Latency: one-block remote lookups on B (p50/p99), against a raw ZeroMQ DEALER/ROUTER echo over
  TCP on loopback with messages of the same sizes (a remote hit is at least one TCP round trip):
      latency_ratio = remote lookup p50 / raw TCP echo p50

    python tools/bench_remote.py [--gib 1] [--latency-lookups 200] [--ucx-tls tcp] [--json]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import benchlib
import msgspec
import numpy as np
import zmq

from kvbm_shm import Client, EngineLayout, KvLayout, Namespace, protocol as p, runtime
from kvbm_shm.cluster.etcd import EtcdClient, EtcdUnavailable
from kvbm_shm.cluster.keys import ClusterKeys
from kvbm_shm.cluster.membership import NodeRecord
from kvbm_shm.cluster.peers import PeerError, PeerLink
from kvbm_shm.cluster.transport import DONE, NixlTransport
from kvbm_shm.hashing import sequence_hashes
from kvbm_shm.shm import PoolSegment, list_segments, unlink

PAGE = 16
BIG = dict(layers=8, heads=8, head_dim=256)  # float32: 8 x 2 x 16 x 2048 x 4 B = 2 MiB a block
SMALL = dict(layers=1, heads=8, head_dim=128)  # 16 KiB a block


def namespace(model: str, dims: dict, tensors) -> Namespace:
    return Namespace(model, KvLayout(dims["layers"], 2, PAGE, dims["heads"] * dims["head_dim"], "float32"),
                     EngineLayout.of(tensors))


def tensors(dims: dict, blocks: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((blocks, dims["heads"], PAGE, 2 * dims["head_dim"]), dtype=np.float32)
            for _ in range(dims["layers"])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, root: Path, name: str, etcd_url: str, secret: Path, cache_gb: float, env: dict,
                 log_dir: Path, log_level: str):
        self.instance = f"br{uuid.uuid4().hex[:6]}{name}"
        self.runtime_dir = Path(tempfile.mkdtemp(prefix=f"kbr{name}", dir="/tmp"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvbm_shm", "serve", "--instance", self.instance, "--runtime-dir",
             str(self.runtime_dir), "--cpu-cache-gb", str(cache_gb), "--log-level", log_level, "--cluster", etcd_url,
             "--node-name", name, "--cluster-secret-file", str(secret), "--cluster-deadline-ms", "120000",
             "--transfer-workers", "0"], env=env, stdout=subprocess.DEVNULL, stderr=open(log_dir / f"{name}.log", "wb"))
        deadline = time.monotonic() + 120
        while runtime.read_info(self.runtime_dir / self.instance) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {name} did not start: {(log_dir / f'{name}.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def client(self) -> Client:
        return Client(instance=self.instance, runtime_dir=self.runtime_dir, name="bench", timeout_s=300,
                      setup_timeout_s=300)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for name in list_segments(f"kvbm-{self.instance}-"):
            unlink(name)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def wait(cond, what: str, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def _echo_server(port_q, n: int, stop):
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    port_q.put(s.bind_to_random_port("tcp://127.0.0.1"))
    reply = b"x" * n
    while not stop.is_set():
        if s.poll(100):
            ident, _ = s.recv_multipart()
            s.send_multipart([ident, reply])
    s.close(0)
    ctx.term()


def echo_rtts(request_bytes: int, reply_bytes: int, count: int) -> list[int]:
    q, stop = mp.Queue(), mp.Event()
    server = mp.Process(target=_echo_server, args=(q, reply_bytes, stop))
    server.start()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(f"tcp://127.0.0.1:{q.get()}")
    msg = b"y" * request_bytes
    out = []
    for i in range(count + 20):
        t0 = time.perf_counter_ns()
        s.send(msg)
        s.recv()
        if i >= 20:
            out.append(time.perf_counter_ns() - t0)
    stop.set()
    server.join(10)
    s.close(0)
    ctx.term()
    return out


def run(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="kbr", dir="/tmp"))
    env = {**os.environ, "PYTHONPATH": f"{benchlib.ROOT}:{os.environ.get('PYTHONPATH', '')}", "UCX_MODULES": "^ib"}
    if args.ucx_tls:
        env.update(UCX_TLS=args.ucx_tls, UCX_NET_DEVICES="lo")
        os.environ.update(UCX_TLS=args.ucx_tls, UCX_NET_DEVICES="lo")
    os.environ["UCX_MODULES"] = "^ib"
    secret = root / "secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, secrets.token_hex(32).encode())
    os.close(fd)
    port, peer_port = free_port(), free_port()
    etcd = subprocess.Popen(["etcd", "--name", "b", "--data-dir", str(root / "etcd"), "--listen-client-urls",
                             f"http://127.0.0.1:{port}", "--advertise-client-urls", f"http://127.0.0.1:{port}",
                             "--listen-peer-urls", f"http://127.0.0.1:{peer_port}", "--initial-advertise-peer-urls",
                             f"http://127.0.0.1:{peer_port}", "--initial-cluster", f"b=http://127.0.0.1:{peer_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nodes: list[Node] = []
    try:
        wait(lambda: _etcd_up(port), "etcd")
        big_blocks = int(args.gib * 1024) // 2
        n_small = args.latency_lookups + 1
        cache_gb = args.gib * 1.05 + 0.05
        log_dir = Path(args.log_dir) if args.log_dir else root
        a = Node(root, "a", f"etcd://127.0.0.1:{port}", secret, cache_gb, env, log_dir, args.log_level)
        nodes.append(a)
        b = Node(root, "b", f"etcd://127.0.0.1:{port}", secret, cache_gb, env, log_dir, args.log_level)
        nodes.append(b)

        big_kv, small_kv = tensors(BIG, big_blocks, 1), tensors(SMALL, n_small, 2)
        big_ns, small_ns = namespace("bench-g4-big", BIG, big_kv), namespace("bench-g4-small", SMALL, small_kv)
        big_hashes = sequence_hashes(list(range(big_blocks * PAGE)), PAGE)
        small_hashes = [sequence_hashes(list(range(i * PAGE, (i + 1) * PAGE)), PAGE, salt=b"%d" % i)[0]
                        for i in range(n_small)]
        ca, cb = a.client(), b.client()
        big_a = ca.register_layout(big_ns, PoolSegment.size_for(big_blocks + 4, big_ns.kv.block_bytes) + 4096)
        small_a = ca.register_layout(small_ns, PoolSegment.size_for(n_small + 4, small_ns.kv.block_bytes) + 4096)
        assert ca.store(big_a.bind(big_kv), big_hashes, list(range(big_blocks))).stored == big_blocks
        assert ca.store(small_a.bind(small_kv), small_hashes, list(range(n_small))).stored == n_small
        del big_kv
        big_b = cb.register_layout(big_ns, PoolSegment.size_for(big_blocks + 4, big_ns.kv.block_bytes) + 4096)
        small_b = cb.register_layout(small_ns, PoolSegment.size_for(n_small + 4, small_ns.kv.block_bytes) + 4096)
        wait(lambda: _g4(cb)["registered_pools"] == 2, "B's pools registered with NIXL")
        wait(lambda: _g4(cb)["nodes"].get("a", {}).get("index_blocks") == big_blocks + n_small, "B's index of A")

        def lookup(pool, hashes) -> tuple[p.LookupReply, int]:
            t0 = time.perf_counter_ns()
            reply = cb.request(p.Lookup(req=0, lease=cb.lease, pool_id=pool.pool_id, hashes=hashes))
            return reply, time.perf_counter_ns() - t0

        reply, _ = lookup(small_b, small_hashes[:1])  # warm-up: the reader connects to A
        assert reply.tiers == [p.Tier.CLUSTER], reply
        lat = []
        for h in small_hashes[1:]:
            reply, ns = lookup(small_b, [h])
            assert reply.tiers == [p.Tier.CLUSTER], reply
            lat.append(ns)
        req_bytes = len(p.encode(p.Lookup(req=1, lease=cb.lease, pool_id=0, hashes=small_hashes[:1]))[1])
        rep_bytes = len(p.encode(p.LookupReply(req=1, block_ids=[0], tiers=[4]))[1])
        echo = echo_rtts(req_bytes, rep_bytes, args.latency_lookups)

        nbytes = big_blocks * big_ns.kv.block_bytes
        hits = []
        for _ in range(args.repeats):
            cb.clear(big_b)
            reply, ns = lookup(big_b, big_hashes)
            assert reply.tiers == [p.Tier.CLUSTER] * big_blocks, f"{len(reply.block_ids)} of {big_blocks} blocks hit"
            hits.append(nbytes / ns)
        remote_first, remote_gbps = hits[0], max(hits)
        raw_first, raw_gbps = raw_nixl_gbps(port, cb, big_b, big_hashes, big_ns.kv.block_bytes, secret, args.repeats)
        lat_p50, echo_p50 = statistics.median(lat), statistics.median(echo)
        rows = [
            {"what": f"remote hit, 1 lookup, best of {args.repeats}", "blocks": big_blocks,
             "GB/s": round(remote_gbps, 3)},
            {"what": "remote hit, the first of them", "blocks": big_blocks, "GB/s": round(remote_first, 3)},
            {"what": f"raw NIXL READ, same descriptors, best of {args.repeats}", "blocks": big_blocks,
             "GB/s": round(raw_gbps, 3)},
            {"what": "raw NIXL READ, the first of them", "blocks": big_blocks, "GB/s": round(raw_first, 3)},
            {"what": "remote 1-block lookup", "p50_us": benchlib.percentile_us(lat, 50),
             "p99_us": benchlib.percentile_us(lat, 99)},
            {"what": "raw TCP ZeroMQ echo", "p50_us": benchlib.percentile_us(echo, 50),
             "p99_us": benchlib.percentile_us(echo, 99)},
        ]
        g4 = _g4(cb)
        benchlib.report("bench_remote (G4)", ["what", "blocks", "GB/s", "p50_us", "p99_us"], rows, {
            "ucx_tls": args.ucx_tls or "UCX default", "block_bytes": big_ns.kv.block_bytes, "bytes": nbytes,
            "remote_hit_gbps": round(remote_gbps, 3), "remote_hit_first_gbps": round(remote_first, 3),
            "raw_nixl_gbps": round(raw_gbps, 3),
            "raw_nixl_first_gbps": round(raw_first, 3),
            "ratio_vs_limit": round(remote_gbps / raw_gbps, 3),
            "remote_lookup_p50_us": benchlib.percentile_us(lat, 50),
            "remote_lookup_p99_us": benchlib.percentile_us(lat, 99),
            "echo_p50_us": benchlib.percentile_us(echo, 50), "echo_p99_us": benchlib.percentile_us(echo, 99),
            "latency_ratio": round(lat_p50 / echo_p50, 2),
            "b_counters": {k: v for k, v in g4["counters"].items() if k.startswith(("remote", "read", "fetch"))},
        }, args.json)
        ca.close(), cb.close()
    finally:
        for node in nodes:
            node.stop()
        etcd.terminate()
        etcd.wait(30)
        shutil.rmtree(root, ignore_errors=True)


def raw_nixl_gbps(etcd_port: int, cb: Client, big_b, hashes: list[bytes], block_bytes: int, secret: Path,
                  repeats: int) -> tuple[float, float]:
    """A's blocks read by a fresh NIXL agent in this process into the same B pool blocks the remote
    hit filled (same bytes: the pool's contents do not change), same descriptors, one READ each time:
    (the first read's GB/s, the best one's)."""
    members = EtcdClient([f"127.0.0.1:{etcd_port}"]).get_prefix(b"/kvbm-shm/nodes/a")
    rec = msgspec.json.decode(members[b"/kvbm-shm/nodes/a"], type=NodeRecord)
    ctx = zmq.Context()
    link = PeerLink(ctx, rec.control, ClusterKeys.from_file(str(secret)), "bench")
    pin = link.call(lambda req, lease: p.PeerPin(req=req, lease=lease, fingerprint=big_b.namespace.fingerprint,
                                                 hashes=hashes), time.monotonic() + 30)
    local_ids = cb.lookup(big_b, hashes)
    assert len(pin.block_ids) == len(local_ids) == len(hashes)
    seg = PoolSegment.attach(big_b.segment.name, table_writable=False)  # pre-faulted, as the agent process maps it
    t = NixlTransport(f"bench-{os.getpid()}")
    t.register("b", seg.data_address, seg.num_blocks * seg.block_stride)
    agent = t.add_peer(pin.metadata)
    local = [seg.data_address + b * seg.block_stride for b in local_ids]
    remote = [pin.data_address + b * pin.block_stride for b in pin.block_ids]
    t.read(agent, local[:1], remote[:1], block_bytes, time.monotonic() + 30)  # connect
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        assert t.read(agent, local, remote, block_bytes, time.monotonic() + 300) == DONE
        runs.append(len(hashes) * block_bytes / (time.perf_counter_ns() - t0))
    try:
        link.call(lambda req, lease: p.Release(req=req, lease=lease, pool_id=pin.pool_id, block_ids=pin.block_ids),
                  time.monotonic() + 10)
    except PeerError:  # the lease lapsed during the reads: the pins went with it
        pass
    link.close()
    t.close()
    del local, remote
    seg.close()
    ctx.term()
    return runs[0], max(runs)


def _etcd_up(port: int) -> bool:
    try:
        EtcdClient([f"127.0.0.1:{port}"], timeout_s=0.5).get_prefix(b"/")
        return True
    except EtcdUnavailable:
        return False


def _g4(client: Client) -> dict:
    return client.stats().tiers["g4"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=1.0, help="bytes of the remote hit, in GiB of 2 MiB blocks")
    ap.add_argument("--latency-lookups", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3, help="remote hits and raw NIXL reads; the best counts")
    ap.add_argument("--ucx-tls", default="", help="UCX_TLS for every process (default: UCX chooses)")
    ap.add_argument("--log-dir", default="", help="keep the coordinators' logs here (default: discarded)")
    ap.add_argument("--log-level", default="WARNING", help="the coordinators' log level")
    ap.add_argument("--json", action="store_true")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
