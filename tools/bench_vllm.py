"""Benchmark: time to first token on a real vLLM (CPU) when another engine process stored the prefix.

Runs in the vLLM environment (`tools/setup_vllm_env.sh .venv-vllm`), from the repository root:

    .venv-vllm/bin/python tools/bench_vllm.py [--prefix-tokens 2048] [--trials 15] [--reserved-cpus 1] [--json]

It builds the "bench" Llama locally (prefill dominates a request), starts its own coordinator,
and measures time to first token (one greedy token, `LLM.generate` wall time) of prompts
`prefix + suffix`:

    no connector             full prefill: the baseline
    connector, miss          full prefill plus the connector's work on a complete miss
                             (one lookup, the blocks stored afterwards); the trial's clock runs
                             until the coordinator has registered the stored blocks, so no
                             background work spills into the next trial; target <= 1.05 x baseline
    connector, hit           the prefix stored by another engine process (engine A) is loaded
    own prefix cache hit     the same prompt again in the same engine: vLLM's own prefix cache
                             has it now, the ideal a hit approaches; target hit <= 1.3 x this

Like with like: every engine runs with the same `VLLM_CPU_NUM_OF_RESERVED_CPU` (a multi-process
vLLM CPU server reserves one more core for an engine with a KV connector, so on a small machine
engines without and with the connector would compute on different cores; the in-process engines
here bind no cores, and the setting keeps them alike if that changes), the hit and its own
prefix-cache hit are the same prompt in the same engine, one right after the other, and the
"connector" and "no connector" engines run side by side with the miss trials alternating between
them. The headline ratios (`hit_vs_own_prefix_cache`, `miss_vs_no_connector`) are medians of the
ratios of such adjacent pairs, which see the same machine load; medians and minima of each kind
are reported too (on a shared machine noise only adds time). The physical limit of a
hit's copy, the prefix's bytes at this machine's memcpy speed, is measured in the same run, and
so is the connector's own work on a miss (hash, lookup, store through the client library, alone):
on a shared machine that work is a steadier measure of the miss overhead than the difference of
two noisy end-to-end times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvbm_shm import runtime  # noqa: E402
from kvbm_shm.client import Client  # noqa: E402
from kvbm_shm.config import ClientConfig  # noqa: E402
from kvbm_shm.hashing import sequence_hashes  # noqa: E402
from kvbm_shm.layout import EngineLayout, KvLayout, Namespace  # noqa: E402
from tests.engines.tiny_llama import SIZES, build_model_dir, prompt_token_ids  # noqa: E402
from tests.engines.vllm_runner import EngineProcess, EngineSpec, Prompt  # noqa: E402

BLOCK = 128  # vLLM's block size on CPU


class Coordinator:
    """A `kvbm-shm serve` process of a private instance, stopped (pools unlinked) on exit."""

    def __init__(self, cpu_cache_gb: float):
        self.instance = f"bench{uuid.uuid4().hex[:8]}"
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="kvb", dir="/tmp"))
        self._args = [sys.executable, "-m", "kvbm_shm", "serve", "--instance", self.instance,
                      "--runtime-dir", str(self.runtime_dir), "--cpu-cache-gb", str(cpu_cache_gb),
                      "--log-level", "WARNING"]
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "Coordinator":
        self._proc = subprocess.Popen(self._args, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = runtime.read_info(self.runtime_dir / self.instance)
            if info is not None and info.pid == self._proc.pid:
                return self
            if self._proc.poll() is not None:
                raise RuntimeError(f"coordinator exited with {self._proc.returncode}")
            time.sleep(0.05)
        self._proc.kill()
        raise RuntimeError("coordinator did not start within 30 s")

    def __exit__(self, *exc) -> None:
        self._proc.terminate()
        self._proc.wait(30)


def memcpy_gbps(num_bytes: int, repeats: int = 5) -> float:
    src = np.ones(num_bytes, np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return num_bytes / best / 1e9


def connector_work_on_miss(coordinator: Coordinator, size, num_tokens: int, trials: int) -> dict:
    """The connector's own work for one missed prompt, timed alone through the client library:
    hashing and the lookup (on the request's critical path), then storing its full blocks (done
    by the worker's background thread). A private pool, so the engines' pool is not touched."""
    import torch

    num_blocks = num_tokens // BLOCK
    tensors = [torch.zeros(num_blocks, size.num_key_value_heads, BLOCK, 2 * size.head_dim)
               for _ in range(size.num_hidden_layers)]  # vLLM's CPU layout, one tensor per layer
    namespace = Namespace(
        model="bench:connector-work-on-miss",
        kv=KvLayout(size.num_hidden_layers, 2, BLOCK, size.num_key_value_heads * size.head_dim, "float32"),
        engine_layout=EngineLayout.of(tensors))
    config = ClientConfig(instance=coordinator.instance, runtime_dir=coordinator.runtime_dir, timeout_s=30)
    lookup_s, store_s = [], []
    with Client(config) as client:
        pool = client.register_layout(namespace, cache_bytes=4 * num_blocks * namespace.kv.block_bytes)
        kv = pool.bind(tensors)
        for i in range(trials):
            tokens = prompt_token_ids(num_tokens, 10**7 + i)
            t0 = time.perf_counter()
            hashes = sequence_hashes(tokens, BLOCK)
            assert client.lookup(pool, hashes) == []
            t1 = time.perf_counter()
            assert client.store(kv, hashes, list(range(num_blocks))).stored == num_blocks
            t2 = time.perf_counter()
            lookup_s.append(t1 - t0)
            store_s.append(t2 - t1)
    return {"lookup_ms": statistics.median(lookup_s) * 1e3, "store_ms": statistics.median(store_s) * 1e3}


def ttft(engine: EngineProcess, tokens: list[int], expect_cached: int | None = None) -> float:
    result = engine.generate([Prompt(tuple(tokens))], max_tokens=1)
    cached = result.requests[0].num_cached_tokens
    if expect_cached is not None and cached != expect_cached:
        raise RuntimeError(f"expected {expect_cached} cached tokens, vLLM reported {cached}")
    return result.generate_s


def stored_blocks(client: Client) -> int:
    return sum(pool.counters["stored_blocks"] + pool.counters["dedup_blocks"] for pool in client.stats().pools)


def ttft_drained(engine: EngineProcess, tokens: list[int], client: Client, timeout_s: float = 30.0) -> float:
    """`ttft` of a complete miss plus the wait until the coordinator holds the prompt's full blocks:
    the connector's background store is part of the trial, not left to the next one."""
    before = stored_blocks(client)
    seconds = ttft(engine, tokens, expect_cached=0)
    t0 = time.perf_counter()
    while stored_blocks(client) < before + len(tokens) // BLOCK:
        if time.perf_counter() - t0 > timeout_s:
            raise RuntimeError(f"the connector did not store the missed prompt's blocks within {timeout_s} s")
        time.sleep(0.0005)
    return seconds + time.perf_counter() - t0


def run(args) -> dict:
    size = SIZES[args.size]
    model_dir = str(build_model_dir(Path(args.model_root) / args.size, size=args.size))
    prefix_bytes = (args.prefix_tokens // BLOCK) * BLOCK * size.num_hidden_layers * 2 * \
        size.num_key_value_heads * size.head_dim * 4
    seed = iter(range(1000, 10**6))
    prefixes = [prompt_token_ids(args.prefix_tokens, next(seed)) for _ in range(args.trials)]

    def suffix() -> list[int]:
        return prompt_token_ids(args.suffix_tokens, next(seed))

    def fresh() -> list[int]:
        return prompt_token_ids(args.prefix_tokens + args.suffix_tokens, next(seed))

    times: dict[str, list[float]] = {k: [] for k in ("none", "miss", "hit", "own")}
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": str(args.reserved_cpus)}
    # every prompt of the run stays cached (an evicted prefix would turn a hit trial into a miss):
    # the prefixes, a fresh prompt per miss trial and warm-up, the private pool of the connector's work
    prompt_bytes = prefix_bytes * (args.prefix_tokens + args.suffix_tokens) / args.prefix_tokens
    cache_gb = args.cpu_cache_gb or 1.5 * (args.trials * (prefix_bytes + prompt_bytes) + 6 * prompt_bytes) / 2**30
    with Coordinator(max(cache_gb, 0.25)) as coordinator:
        work = connector_work_on_miss(coordinator, size, args.prefix_tokens + args.suffix_tokens, args.trials)
        kv = {"kv_connector": "KvbmShmConnector", "kv_connector_module_path": "kvbm_shm.integrations.vllm",
              "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
              "kv_connector_extra_config": {"instance": coordinator.instance,
                                            "runtime_dir": str(coordinator.runtime_dir),
                                            "timeout_s": 5.0}}  # the first engine creates the pool
        with EngineProcess(EngineSpec(model_dir, kv_transfer_config=kv, env=env)) as engine_a:
            for p in prefixes:
                ttft(engine_a, p + suffix())
        with EngineProcess(EngineSpec(model_dir, kv_transfer_config=kv, env=env)) as with_conn, \
                EngineProcess(EngineSpec(model_dir, env=env)) as without, \
                Client(ClientConfig(instance=coordinator.instance, runtime_dir=coordinator.runtime_dir)) as observer:
            ttft(with_conn, fresh())  # warm-up: first-call costs out of the trials
            ttft(without, fresh())
            for i, p in enumerate(prefixes):
                pair = [("miss", with_conn), ("none", without)]
                for name, engine in pair if i % 2 == 0 else pair[::-1]:
                    timed = ttft_drained(engine, fresh(), observer) if name == "miss" else ttft(engine, fresh(), 0)
                    times[name].append(timed)
                prompt = p + suffix()
                times["hit"].append(ttft(with_conn, prompt, expect_cached=len(p) // BLOCK * BLOCK))
                times["own"].append(ttft(with_conn, prompt, expect_cached=len(p) // BLOCK * BLOCK))

    gbps = memcpy_gbps(prefix_bytes)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    return {
        "model": {"size": args.size, "layers": size.num_hidden_layers, "hidden": size.hidden_size,
                  "kv_heads": size.num_key_value_heads, "head_dim": size.head_dim},
        "prefix_tokens": args.prefix_tokens, "suffix_tokens": args.suffix_tokens, "trials": args.trials,
        "prefix_bytes": prefix_bytes, "memcpy_gbps": gbps,
        "load_floor_ms": prefix_bytes / gbps / 1e6,
        "ttft_ms": {k: [round(t * 1e3, 2) for t in v] for k, v in times.items()},
        "median_ttft_ms": {k: v * 1e3 for k, v in med.items()},
        "min_ttft_ms": {k: v * 1e3 for k, v in best.items()},
        "reserved_cpus": args.reserved_cpus,
        "miss_vs_no_connector": statistics.median(m / n for m, n in zip(times["miss"], times["none"])),
        "miss_vs_no_connector_of_medians": med["miss"] / med["none"],
        "miss_vs_no_connector_of_minima": best["miss"] / best["none"],
        "connector_work_on_miss_ms": work,
        "miss_work_ratio": (best["none"] + (work["lookup_ms"] + work["store_ms"]) / 1e3) / best["none"],
        "hit_speedup": med["none"] / med["hit"],
        "hit_vs_own_prefix_cache": statistics.median(h / o for h, o in zip(times["hit"], times["own"])),
        "hit_vs_own_prefix_cache_of_medians": med["hit"] / med["own"],
        "hit_vs_own_prefix_cache_of_minima": best["hit"] / best["own"],
        "cpus": os.cpu_count(),
    }


def print_table(r: dict) -> None:
    m, b = r["median_ttft_ms"], r["min_ttft_ms"]
    print(f"vLLM CPU, {r['model']['size']} Llama ({r['model']['layers']} layers, hidden {r['model']['hidden']}), "
          f"prompt {r['prefix_tokens']} + {r['suffix_tokens']} tokens, {r['trials']} trials, {r['cpus']} CPUs, "
          f"VLLM_CPU_NUM_OF_RESERVED_CPU={r['reserved_cpus']} for every engine")
    print(f"{'TTFT, ms':<34}{'median':>9}{'ratio':>8}{'min':>9}{'ratio':>8}")
    rows = [("no connector (full prefill)", "none"), ("connector, complete miss", "miss"),
            ("connector, prefix from engine A", "hit"), ("own prefix cache, same prompt", "own")]
    for label, k in rows:
        print(f"{label:<34}{m[k]:>9.1f}{m[k] / m['none']:>8.3f}{b[k]:>9.1f}{b[k] / b['none']:>8.3f}")
    w = r["connector_work_on_miss_ms"]
    print(f"connector work per missed prompt, timed alone: hash + lookup {w['lookup_ms']:.2f} ms (critical path), "
          f"store {w['store_ms']:.2f} ms (background); (min full prefill + both) / min full prefill = "
          f"{r['miss_work_ratio']:.4f}")
    print(f"miss / no connector (median of adjacent pairs) = {r['miss_vs_no_connector']:.3f}; target <= 1.05")
    print(f"hit / own prefix cache (median of adjacent pairs) = {r['hit_vs_own_prefix_cache']:.2f}; target <= 1.3")
    print(f"physical limit of the hit's copy: {r['prefix_bytes'] / 2**20:.1f} MiB at {r['memcpy_gbps']:.1f} GB/s "
          f"memcpy = {r['load_floor_ms']:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix-tokens", type=int, default=2048)
    parser.add_argument("--suffix-tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=15)  # enough to resolve a 5% difference here
    parser.add_argument("--size", choices=sorted(SIZES), default="bench")
    parser.add_argument("--model-root", default=os.path.join(tempfile.gettempdir(), "kvbm-bench-models"))
    parser.add_argument("--cpu-cache-gb", type=float, default=0.0,
                        help="G2 budget (default: room for every prompt of the run)")
    parser.add_argument("--reserved-cpus", type=int, default=1,
                        help="VLLM_CPU_NUM_OF_RESERVED_CPU for every engine (the same for all: like with like)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.prefix_tokens < BLOCK:
        parser.error(f"--prefix-tokens must be at least one block ({BLOCK})")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
