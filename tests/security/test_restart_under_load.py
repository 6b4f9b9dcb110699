"""Engines keep storing and loading while blocks are evicted and reused under their loads (which
hold no pins), and while the coordinator is stopped, killed and restarted under them: every block
an engine reports loaded holds exactly the bytes stored for its hash.

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

import pytest
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


def churn(instance, runtime_dir, seed: int, run_s: float, verify: bool = True) -> dict:
    """Store and load random prefixes until `run_s` passes; count what was loaded and how much was wrong.
    With `verify` off, a load vouches for blocks by their records alone (the checksum pass is skipped)."""
    rng = random.Random(seed)
    src, dst = engine.make_kv(None), engine.make_kv(None)
    counts = {"stores": 0, "loads": 0, "loaded_blocks": 0, "wrong_blocks": 0, "errors": 0}
    client = engine.connect(instance, runtime_dir, f"churn-{seed}", timeout_s=2.0, verify_checksums=verify)
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
    deadline = time.monotonic() + 60  # a loaded machine starts children slowly: restart under them, not before
    while sum(c.name.startswith("churn-") for c in engine.stats_of(instance, runtime_dir).clients) < 2:
        assert time.monotonic() < deadline, "the churn clients never connected"
        time.sleep(0.05)
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


def test_no_wrong_bytes_while_blocks_are_evicted_and_reused_under_unpinned_loads(coordinator_factory, instance,
                                                                                 runtime_dir):
    from kvbm_shm.shm import PoolSegment

    ns = engine.namespace(engine.make_kv(None))
    coordinator_factory(cpu_cache_gb=PoolSegment.size_for(6, ns.kv.block_bytes) / 2**30)  # 6 blocks, 40 chains
    run_s = RUN_S / 2
    engines = [start_child(churn, instance, runtime_dir, seed, run_s, verify, timeout_s=run_s + 60)
               for seed, verify in ((3, True), (4, True), (5, False))]
    results = [e.result() for e in engines]
    total = {k: sum(r[k] for r in results) for k in results[0]}
    with engine.connect(instance, runtime_dir, "observer") as client:
        pool = client.stats().pools[0]
    print(f"evictions under load: {total}, evicted {pool.counters['evicted_blocks']}, pinned {pool.pinned}")
    assert total["wrong_blocks"] == 0
    assert total["loaded_blocks"] > 20 and pool.counters["evicted_blocks"] > 100
    assert pool.pinned == 0


# ---------------------------------------------------------------- one block, rewritten under every load

BIG = (1, 16, 2 * 32768)  # one layer, 16 tokens, K and V of 32768 floats: 4 MiB blocks, long copies


def big_namespace(kv):
    from kvbm_shm import EngineLayout, KvLayout, Namespace

    return Namespace("race-test", KvLayout(1, 2, 16, 32768, "float32"), EngineLayout.of(kv))


def flip(instance, runtime_dir, run_s: float) -> int:
    """Store chain A, then chain B, then A, ... into a one-block pool: each store evicts the other."""
    kv = [torch.stack([torch.full(BIG, 1.0), torch.full(BIG, 2.0)])]
    a, b = engine.prompt_hashes(1, start=0), engine.prompt_hashes(1, start=10_000)
    stores = 0
    with engine.connect(instance, runtime_dir, "flipper") as client:
        pool = client.register_layout(big_namespace(kv))
        bound = pool.bind(kv)
        t_end = time.monotonic() + run_s
        while time.monotonic() < t_end:
            stores += client.store(bound, a, [0]).stored
            time.sleep(0.002)  # A stays a moment, so readers find it (and are caught by B mid-copy)
            stores += client.store(bound, b, [1]).stored
    return stores


def read_a(instance, runtime_dir, run_s: float, verify: bool) -> dict:
    """Load chain A again and again while it is evicted and rewritten with B's bytes."""
    kv = [torch.zeros(2, *BIG)]
    a = engine.prompt_hashes(1, start=0)
    counts = {"loaded": 0, "refused": 0, "missed": 0, "wrong": 0}
    with engine.connect(instance, runtime_dir, "reader", verify_checksums=verify) as client:
        pool = client.register_layout(big_namespace(kv))
        bound = pool.bind(kv)
        t_end = time.monotonic() + run_s
        while time.monotonic() < t_end:
            kv[0][1].zero_()
            result = client.load(bound, a, [1])
            if result.loaded:
                counts["loaded"] += 1
                counts["wrong"] += not bool(torch.all(kv[0][1] == 1.0))
            else:
                counts["refused" if result.failed else "missed"] += 1
    return counts


@pytest.mark.parametrize("verify", [True, False], ids=["checksummed", "records-only"])
def test_a_block_rewritten_during_the_copy_is_never_loaded(coordinator_factory, instance, runtime_dir, verify):
    from kvbm_shm.shm import PoolSegment

    ns = big_namespace([torch.zeros(2, *BIG)])
    coordinator_factory(cpu_cache_gb=PoolSegment.size_for(1, ns.kv.block_bytes) / 2**30)
    flipper = start_child(flip, instance, runtime_dir, 4.0, timeout_s=60)
    counts = start_child(read_a, instance, runtime_dir, 4.0, verify, timeout_s=60).result()
    stores = flipper.result()
    print(f"one block flipped {stores} times under loads ({'checksummed' if verify else 'records only'}): {counts}")
    assert counts["wrong"] == 0
    assert counts["loaded"] > 0 and counts["refused"] > 0  # the race did happen, and was caught
