"""Benchmark: the control plane against raw ZeroMQ on the same machine.

From 1, 2 and 4 client processes, each sending one request at a time (as an engine does):
- `Client.lookup` of 64 cached blocks (answered from the pool's hash index: no round trip);
- a request's 256-block hit lookup with its hashing: `sequence_hashes` of 4,096 token ids (a
  list of ints, as vLLM holds them) then `Client.lookup` (local), and the same through the
  coordinator (a raw `Lookup` request: one round trip, the path of pinned lookups and of
  requests that continue on disk);
- allocate+commit of 64 blocks (two round trips).
In the same run, a raw pyzmq DEALER/ROUTER echo server answers messages of exactly the sizes of
the Lookup request and reply (64 and 256 blocks) from the same number of clients: one round trip
of a Python service over ipc://. Rounds alternate between the paths and the echo, since a shared
machine's load drifts; ratios are medians over rounds.

    lookup_vs_echo = 256-block hit lookup with hashing p50 / raw echo p50 (1 client); target <= 0.25
    lookup_blocks_per_s = blocks looked up (with hashing) per second by one client process; target >= 1,000,000
    local_p99_over_p50, coordinator_p99_over_p50 = tail of each 256-block path under steady load
                     (every client looping; the most clients run); target <= 1.5
    echo_p99_over_p50 = the raw echo's own tail under the same load: what the machine allows
    ratio_vs_limit = 64-block Client.lookup p50 / raw echo p50 (1 client)

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
REQUEST_BLOCKS = 256  # a request's prompt: 4,096 tokens
PAGE = 16
NAMESPACE = Namespace("bench-control", KvLayout(1, 2, PAGE, 64, "float16"),
                      EngineLayout((TensorSpec((2, PAGE, 64), 1, "float16"),)))


def _hashes(seed: int, n: int = BATCH) -> list[bytes]:
    return sequence_hashes(list(range(seed, seed + n * PAGE)), PAGE)


def _until(start_at: float) -> None:
    time.sleep(max(0.0, start_at - time.time()))


def _request_tokens() -> list[int]:
    return list(range(1, 1 + REQUEST_BLOCKS * PAGE))


def coordinator_client(instance, runtime_dir, op: str, seconds: float, start_at: float, seed: int):
    client = Client(instance=instance, runtime_dir=runtime_dir, name=f"bench-{seed}")
    pool = client.register_layout(NAMESPACE)
    stored = _hashes(0)
    tokens = _request_tokens()
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
        elif op == "hash+lookup256":
            hits = client.lookup(pool, sequence_hashes(tokens, PAGE))
            assert len(hits) == REQUEST_BLOCKS
        elif op == "hash+coordinator lookup256":
            hits = client.request(p.Lookup(req=0, lease=client.lease, pool_id=pool.pool_id,
                                           hashes=sequence_hashes(tokens, PAGE))).block_ids
            assert len(hits) == REQUEST_BLOCKS
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


def echo_server(endpoint: str, replies: dict[int, list[bytes]], ready) -> None:
    """Answers each request with the reply of the same batch size (keyed by the request's size)."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(endpoint)
    ready.set()
    while True:
        frames = s.recv_multipart()
        if frames[1] == b"stop":
            break
        s.send_multipart([frames[0], *replies[sum(map(len, frames[1:]))]])
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
    blocks = REQUEST_BLOCKS if kind.endswith("256") else BATCH
    return {"path": kind, "clients": clients, "p50_us": benchlib.percentile_us(flat, 50),
            "p99_us": benchlib.percentile_us(flat, 99),
            "blocks_per_s": int(len(flat) * blocks / seconds)}


def _lookup_frames(blocks: int) -> tuple[list[bytes], list[bytes]]:
    hashes = sequence_hashes(_request_tokens()[:blocks * PAGE], PAGE)
    request = p.encode(p.Lookup(req=1, lease=bytes(p.LEASE_TOKEN_BYTES), pool_id=0, hashes=hashes))
    reply = p.encode(p.LookupReply(req=1, block_ids=list(range(1000, 1000 + blocks)), tiers=[p.Tier.CPU] * blocks))
    return request, reply


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="length of one round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating coordinator/echo rounds per client count")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    rows, ratios, ratios256 = [], {}, {}
    with ctx.Pool(max(args.clients)) as workers, benchlib.coordinator(0.25, "--transfer-workers", "0") as (
            instance, runtime_dir):
        with Client(instance=instance, runtime_dir=runtime_dir) as c:
            pool = c.register_layout(NAMESPACE)
            for hashes in (_hashes(0), sequence_hashes(_request_tokens(), PAGE)):
                ids = c.request(p.Allocate(req=0, lease=c.lease, pool_id=pool.pool_id, hashes=hashes)).block_ids
                ids = [b for b in ids if b >= 0]
                c.request(p.Commit(req=0, lease=c.lease, pool_id=pool.pool_id, block_ids=ids, checksums=[0] * len(ids)))
                c.touch(pool, hashes, priority=100)  # the allocate runs evict everything else first
        endpoint = f"ipc://{runtime_dir}/echo.sock"
        request, reply = _lookup_frames(BATCH)
        request256, reply256 = _lookup_frames(REQUEST_BLOCKS)
        replies = {sum(map(len, request)): reply, sum(map(len, request256)): reply256}
        ready = ctx.Manager().Event()
        server = ctx.Process(target=echo_server, args=(endpoint, replies, ready), daemon=True)
        server.start()
        ready.wait(30)
        for n in args.clients:
            # rounds alternate, so a shared machine's drifting load hits both sides alike
            runs = {"lookup (hash index)": [], "raw zmq echo (same sizes)": [], "hash+lookup256": [],
                    "hash+coordinator lookup256": [], "raw zmq echo (same sizes) 256": [],
                    "coordinator allocate+commit": []}
            for _ in range(args.rounds):
                runs["lookup (hash index)"].append(run_clients(
                    workers, coordinator_client, lambda i: (instance, runtime_dir, "lookup"), n, args.seconds))
                runs["raw zmq echo (same sizes)"].append(run_clients(
                    workers, echo_client, lambda i: (endpoint, request), n, args.seconds))
                for op in ("hash+lookup256", "hash+coordinator lookup256"):
                    runs[op].append(run_clients(
                        workers, coordinator_client, lambda i: (instance, runtime_dir, op), n, args.seconds))
                runs["raw zmq echo (same sizes) 256"].append(run_clients(
                    workers, echo_client, lambda i: (endpoint, request256), n, args.seconds))
            runs["coordinator allocate+commit"].append(run_clients(
                workers, coordinator_client, lambda i: (instance, runtime_dir, "allocate+commit"), n, args.seconds))
            def median_ratio(path: str, limit: str) -> float:
                return round(statistics.median(summarize("", n, a, 1)["p50_us"] / summarize("", n, b, 1)["p50_us"]
                                               for a, b in zip(runs[path], runs[limit])), 3)

            ratios[n] = median_ratio("lookup (hash index)", "raw zmq echo (same sizes)")
            ratios256[n] = {"local": median_ratio("hash+lookup256", "raw zmq echo (same sizes) 256"),
                            "coordinator": median_ratio("hash+coordinator lookup256", "raw zmq echo (same sizes) 256")}
            for path, rounds in runs.items():
                rows.append(summarize(path, n, [lat for r in rounds for lat in r], args.seconds * len(rounds)))
        stop = zmq.Context.instance().socket(zmq.DEALER)
        stop.connect(endpoint)
        stop.send_multipart([b"stop"])
        server.join(10)
        stop.close(0)
    def row(path: str, clients: int) -> dict:
        return next(r for r in rows if r["path"] == path and r["clients"] == clients)

    one, most = min(args.clients), max(args.clients)
    local, remote = row("hash+lookup256", most), row("hash+coordinator lookup256", most)
    echo = row("raw zmq echo (same sizes) 256", most)
    summary = {
        "lookup_vs_echo": ratios256[one]["local"],
        "coordinator_lookup_vs_echo": ratios256[one]["coordinator"],
        "lookup_vs_echo_by_clients": ratios256,
        "lookup_blocks_per_s": row("hash+lookup256", one)["blocks_per_s"],
        "local_p99_over_p50": round(local["p99_us"] / local["p50_us"], 2),
        "coordinator_p99_over_p50": round(remote["p99_us"] / remote["p50_us"], 2),
        "echo_p99_over_p50": round(echo["p99_us"] / echo["p50_us"], 2),  # the machine's own tail, same load
        "steady_load_clients": most,
        "ratio_vs_limit": ratios[one],
        "ratio_by_clients": ratios,
        "targets": "lookup_vs_echo <= 0.25; lookup_blocks_per_s >= 1000000 (1 client); p99_over_p50 <= 1.5",
        "message_bytes": {"lookup_request": sum(map(len, request)), "lookup_reply": sum(map(len, reply)),
                          "lookup256_request": sum(map(len, request256)), "lookup256_reply": sum(map(len, reply256))},
    }
    benchlib.report("bench_control: lookups over ipc://", ["path", "clients", "p50_us", "p99_us",
                    "blocks_per_s"], rows, summary, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
