"""Benchmark: the coordinator's control plane against raw ZeroMQ on the same machine.

Lookup of 64-block batches and allocate+commit of 64-block batches, from 1, 2 and 4 client
processes, each client sending one request at a time (a round trip per call, as an engine does).
In the same run, a raw pyzmq DEALER/ROUTER echo server answers messages of exactly the same sizes
(the encoded Lookup request and its reply) from the same number of clients: that echo is the
limit for a Python service over ipc://. Reports p50/p99 round trip and blocks per second.

    ratio_vs_limit = coordinator lookup p50 / raw echo p50 (1 client; the median over rounds that
                     alternate between the two, since a shared machine's load drifts); target <= 1.5
    lookup_blocks_per_s = looked-up blocks per second, all clients (best client count); target >= 300,000

    python tools/bench_control.py [--seconds 1] [--rounds 3] [--clients 1 2 4] [--json]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import time

import benchlib  # noqa: F401  (puts the repo on sys.path)
import zmq

from kvbm_shm import Client, EngineLayout, KvLayout, Namespace, protocol as p
from kvbm_shm.hashing import sequence_hashes
from kvbm_shm.layout import TensorSpec

BATCH = 64
PAGE = 16
NAMESPACE = Namespace("bench-control", KvLayout(1, 2, PAGE, 64, "float16"),
                      EngineLayout((TensorSpec((2, PAGE, 64), 1, "float16"),)))


def _hashes(seed: int, n: int = BATCH) -> list[bytes]:
    return sequence_hashes(list(range(seed, seed + n * PAGE)), PAGE)


def _until(start_at: float) -> None:
    time.sleep(max(0.0, start_at - time.time()))


def coordinator_client(instance, runtime_dir, op: str, seconds: float, start_at: float, seed: int):
    client = Client(instance=instance, runtime_dir=runtime_dir, name=f"bench-{seed}")
    pool = client.register_layout(NAMESPACE)
    stored = _hashes(0)
    base = random.getrandbits(31)  # fresh hashes for every run and client (token ids are uint32)
    lat = []
    n = 0
    _until(start_at)
    end = time.time() + seconds
    while time.time() < end:
        t0 = time.perf_counter_ns()
        if op == "lookup":
            hits = client.lookup(pool, stored)
            assert len(hits) == BATCH
        else:
            fresh = _hashes((base + n * BATCH * PAGE) % (1 << 31))
            reply = client.request(p.Allocate(req=0, lease=client.lease, pool_id=pool.pool_id, hashes=fresh))
            ids = [b for b in reply.block_ids if b >= 0]
            client.request(p.Commit(req=0, lease=client.lease, pool_id=pool.pool_id, block_ids=ids,
                                    checksums=[0] * len(ids)))
        lat.append(time.perf_counter_ns() - t0)
        n += 1
    client.close()
    return lat


def echo_server(endpoint: str, reply_frames: list[bytes], ready) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(endpoint)
    ready.set()
    while True:
        frames = s.recv_multipart()
        if frames[1] == b"stop":
            break
        s.send_multipart([frames[0], *reply_frames])
    s.close(0)
    ctx.term()


def echo_client(endpoint: str, request_frames: list[bytes], seconds: float, start_at: float, seed: int):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(endpoint)
    lat = []
    _until(start_at)
    end = time.time() + seconds
    while time.time() < end:
        t0 = time.perf_counter_ns()
        s.send_multipart(request_frames)
        s.recv_multipart()
        lat.append(time.perf_counter_ns() - t0)
    s.close(0)
    ctx.term()
    return lat


def run_clients(pool, fn, args_of, clients: int, seconds: float) -> list[list[int]]:
    start_at = time.time() + 1.0
    jobs = [pool.apply_async(fn, (*args_of(i), seconds, start_at, i)) for i in range(clients)]
    return [j.get(timeout=seconds + 120) for j in jobs]


def summarize(kind: str, clients: int, lats: list[list[int]], seconds: float) -> dict:
    flat = [x for lat in lats for x in lat]
    return {"path": kind, "clients": clients, "p50_us": benchlib.percentile_us(flat, 50),
            "p99_us": benchlib.percentile_us(flat, 99),
            "blocks_per_s": int(len(flat) * BATCH / seconds)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="length of one round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating coordinator/echo rounds per client count")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    rows, ratios = [], {}
    with ctx.Pool(max(args.clients)) as workers, benchlib.coordinator(0.25, "--transfer-workers", "0") as (
            instance, runtime_dir):
        with Client(instance=instance, runtime_dir=runtime_dir) as c:
            pool = c.register_layout(NAMESPACE)
            ids = c.request(p.Allocate(req=0, lease=c.lease, pool_id=pool.pool_id, hashes=_hashes(0))).block_ids
            c.request(p.Commit(req=0, lease=c.lease, pool_id=pool.pool_id, block_ids=ids, checksums=[0] * len(ids)))
            c.touch(pool, _hashes(0), priority=100)  # the allocate runs evict everything else first
        endpoint = f"ipc://{runtime_dir}/echo.sock"
        request = p.encode(p.Lookup(req=1, lease=bytes(p.LEASE_TOKEN_BYTES), pool_id=0, hashes=_hashes(0)))
        reply = p.encode(p.LookupReply(req=1, block_ids=list(range(1000, 1000 + BATCH)), tiers=[p.Tier.CPU] * BATCH))
        ready = ctx.Manager().Event()
        server = ctx.Process(target=echo_server, args=(endpoint, reply, ready), daemon=True)
        server.start()
        ready.wait(30)
        for n in args.clients:
            # rounds alternate, so a shared machine's drifting load hits both sides alike
            runs = {"coordinator lookup": [], "raw zmq echo (same sizes)": [], "coordinator allocate+commit": []}
            for _ in range(args.rounds):
                runs["coordinator lookup"].append(run_clients(
                    workers, coordinator_client, lambda i: (instance, runtime_dir, "lookup"), n, args.seconds))
                runs["raw zmq echo (same sizes)"].append(run_clients(
                    workers, echo_client, lambda i: (endpoint, request), n, args.seconds))
            runs["coordinator allocate+commit"].append(run_clients(
                workers, coordinator_client, lambda i: (instance, runtime_dir, "allocate+commit"), n, args.seconds))
            per_round = [summarize("", n, a, args.seconds)["p50_us"] / summarize("", n, b, args.seconds)["p50_us"]
                         for a, b in zip(runs["coordinator lookup"], runs["raw zmq echo (same sizes)"])]
            ratios[n] = round(statistics.median(per_round), 2)
            for path, rounds in runs.items():
                rows.append(summarize(path, n, [lat for r in rounds for lat in r], args.seconds * len(rounds)))
        stop = zmq.Context.instance().socket(zmq.DEALER)
        stop.connect(endpoint)
        stop.send_multipart([b"stop"])
        server.join(10)
        stop.close(0)
    lookup = [r for r in rows if r["path"] == "coordinator lookup"]
    summary = {
        "ratio_vs_limit": ratios[min(args.clients)],
        "ratio_by_clients": ratios,
        "lookup_blocks_per_s": max(r["blocks_per_s"] for r in lookup),
        "targets": "ratio_vs_limit <= 1.5; lookup_blocks_per_s >= 300000",
        "message_bytes": {"lookup_request": sum(map(len, request)), "lookup_reply": sum(map(len, reply))},
    }
    benchlib.report("bench_control: 64-block batches over ipc://", ["path", "clients", "p50_us", "p99_us",
                    "blocks_per_s"], rows, summary, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
