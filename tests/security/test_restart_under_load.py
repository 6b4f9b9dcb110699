"""Engines keep storing and loading while the coordinator is stopped, killed and restarted under
them: every block an engine reports loaded holds exactly the bytes stored for its hash.

Each block's bytes are a function of its sequence hash, so a loader can tell a right block from a
wrong one without knowing who stored it. Two engine processes store and load random prefixes of
40 chains into a pool too small to hold them all (evictions, reuse of block ids), while the test
restarts the coordinator three times: a clean stop (SIGTERM: pools unlinked, recreated by the next
start) and a crash (SIGKILL: pools adopted by the next start). Clients survive each restart with
their old mappings and leases, the case where a lease id reused across starts once served another
hash's bytes as verified. Wrong blocks served: must be zero.
"""

from __future__ import annotations

import random
import time

import torch

from kvbm_shm.errors import KvbmError

from .. import engine
from ..procs import start_child

CHAINS, RUN_S = 40, 14.0


def expected_block(h: bytes) -> list[torch.Tensor]:
    """The bytes every engine stores for sequence hash `h`: one tensor per layer."""
    g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") >> 1)
    shape = (engine.HEADS, engine.PAGE, 2 * engine.HEAD_DIM)
    return [torch.randn(shape, generator=g) for _ in range(engine.LAYERS)]


def churn(instance, runtime_dir, seed: int, run_s: float) -> dict:
    """Store and load random prefixes until `run_s` passes; count what was loaded and how much was wrong."""
    rng = random.Random(seed)
    src, dst = engine.make_kv(None), engine.make_kv(None)
    counts = {"stores": 0, "loads": 0, "loaded_blocks": 0, "wrong_blocks": 0, "errors": 0}
    client = engine.connect(instance, runtime_dir, f"churn-{seed}", timeout_s=2.0)
    pool = client.register_layout(engine.namespace(src))
    src_kv, dst_kv = pool.bind(src), pool.bind(dst)
    t_end = time.monotonic() + run_s
    while time.monotonic() < t_end:
        chain = rng.randrange(CHAINS)
        hashes = engine.prompt_hashes(rng.randint(1, 3), start=chain * 1000)
        try:
            if rng.random() < 0.5:
                ids = rng.sample(range(engine.DEVICE_BLOCKS), len(hashes))
                for b, h in zip(ids, hashes):
                    for layer, t in zip(src, expected_block(h)):
                        layer[b] = t
                client.store(src_kv, hashes, ids)
                counts["stores"] += 1
            else:
                ids = rng.sample(range(engine.DEVICE_BLOCKS), len(hashes))
                for layer in dst:
                    layer[ids] = 0
                result = client.load(dst_kv, hashes, ids)
                counts["loads"] += 1
                counts["loaded_blocks"] += result.loaded
                for b, h in zip(ids[:result.loaded], hashes):
                    if not all(torch.equal(layer[b], t) for layer, t in zip(dst, expected_block(h))):
                        counts["wrong_blocks"] += 1
        except KvbmError:  # the coordinator is down or restarting: the engine goes on without it
            counts["errors"] += 1
            time.sleep(0.05)
    client.close()
    return counts


def test_no_wrong_bytes_while_the_coordinator_restarts_under_live_clients(coordinator_factory, instance,
                                                                          runtime_dir):
    from kvbm_shm.shm import PoolSegment

    ns = engine.namespace(engine.make_kv(None))
    budget_gb = PoolSegment.size_for(24, ns.kv.block_bytes) / 2**30  # 24 blocks for 40 chains of 1-3
    coordinator = coordinator_factory(cpu_cache_gb=budget_gb)
    engines = [start_child(churn, instance, runtime_dir, seed, RUN_S, timeout_s=RUN_S + 60) for seed in (1, 2)]
    for how in ("stop", "kill", "stop"):
        time.sleep(RUN_S / 5)
        if how == "stop":
            coordinator.stop()
        else:
            coordinator.kill()
        time.sleep(0.3)  # the engines see it gone
        coordinator = coordinator_factory(cpu_cache_gb=budget_gb)
    results = [e.result() for e in engines]
    total = {k: sum(r[k] for r in results) for k in results[0]}
    print(f"restart under load: {total}")
    assert total["wrong_blocks"] == 0
    assert total["loaded_blocks"] > 20 and total["stores"] > 20
