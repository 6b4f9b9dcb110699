"""End to end on a real vLLM (CPU, fp32, eager): engine processes share prefix KV through the
service with `KvbmShmConnector`.

Every engine is a new process (`EngineProcess`); the coordinator is a real `kvbm-shm serve`
process of this test's instance. A prompt is 2 full blocks (vLLM's CPU block is 128 tokens) and
a partial one; the prompt of engine B shares the 2 full blocks with engine A's and then diverges.
The reference output is HF transformers' greedy continuation, which is also vLLM's output
without any cache (`test_vllm_baseline.py`).
"""

from __future__ import annotations

import time
from importlib.metadata import entry_points

import numpy as np
import pytest

pytest.importorskip("vllm")

from kvbm_shm.hashing import salt_for, sequence_hashes
from kvbm_shm.shm import BlockState, PoolSegment
from tests.engines.tiny_llama import build_lora_dir, prompt_token_ids
from tests.engines.vllm_runner import EngineProcess, EngineSpec, Prompt, hf_greedy
from tests.procs import wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

BLOCK = 128
MAX_TOKENS = 8
PREFIX = prompt_token_ids(2 * BLOCK, seed=11)
PROMPT_A = tuple(PREFIX + prompt_token_ids(44, seed=12))
PROMPT_B = tuple(PREFIX + prompt_token_ids(30, seed=13))


def connector_config(coordinator, *, module_path: bool = True, **extra) -> dict:
    config = {
        "kv_connector": "KvbmShmConnector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"instance": coordinator.instance,
                                      "runtime_dir": str(coordinator.runtime_dir), **extra},
    }
    if module_path:
        config["kv_connector_module_path"] = "kvbm_shm.integrations.vllm"
    return config


def pool_records(coordinator) -> tuple[str, np.ndarray]:
    (name,) = [s for s in coordinator.segments() if "-pool-" in s]
    seg = PoolSegment.attach(name, writable=False)
    try:
        return name, seg.read_records()
    finally:
        seg.close()


def registered_hashes(coordinator) -> set[bytes]:
    _, records = pool_records(coordinator)
    return {bytes(r["hash"]) for r in records if r["state"] == BlockState.REGISTERED}


def prefix_hashes(cache_salt: str | None = None, lora_name: str | None = None) -> list[bytes]:
    return sequence_hashes(PREFIX, BLOCK, salt_for(cache_salt, lora_name))


@pytest.fixture(scope="module")
def expected(tiny_model_dir) -> dict:
    return {p: hf_greedy(tiny_model_dir, p, MAX_TOKENS) for p in (PROMPT_A, PROMPT_B)}


def test_prefix_stored_by_one_engine_process_is_loaded_by_another(tiny_model_dir, coordinator, expected):
    if not any(ep.name == "kvbm_shm" for ep in entry_points(group="vllm.general_plugins")):
        pytest.skip("kvbm-shm is not installed in this environment (its vllm.general_plugins entry point)")
    spec = EngineSpec(tiny_model_dir, kv_transfer_config=connector_config(coordinator, module_path=False))

    with EngineProcess(spec) as a:
        (ra,) = a.generate([Prompt(PROMPT_A)], MAX_TOKENS).requests
        pid_a = a.pid
    assert ra.num_cached_tokens == 0
    assert ra.token_ids == expected[PROMPT_A]
    # 308 tokens were computed: the two full blocks of the prompt are in the service
    assert registered_hashes(coordinator) == set(prefix_hashes())

    with EngineProcess(spec) as b:
        (rb,) = b.generate([Prompt(PROMPT_B)], MAX_TOKENS).requests
        assert b.pid != pid_a
    assert rb.num_cached_tokens == 2 * BLOCK
    assert rb.token_ids == expected[PROMPT_B]


def test_corrupted_block_is_detected_and_recomputed(tiny_model_dir, coordinator, expected):
    kv = connector_config(coordinator)
    with EngineProcess(EngineSpec(tiny_model_dir, kv_transfer_config=kv)) as a:
        a.generate([Prompt(PROMPT_A)], MAX_TOKENS)

    # change the bytes of the first prefix block behind the service's back
    name, records = pool_records(coordinator)
    (block_id,) = np.flatnonzero(records["hash"] == np.void(prefix_hashes()[0]))
    seg = PoolSegment.attach(name)
    try:
        data = seg.block(int(block_id)).view(np.float32)
        data[:] = np.random.default_rng(0).standard_normal(data.shape, np.float32) * 3
        assert seg.counter("invalidated_blocks") == 0
    finally:
        seg.close()

    # vLLM's prefix cache off: B's second request can only hit in the service
    spec_b = EngineSpec(tiny_model_dir, kv_transfer_config=kv, enable_prefix_caching=False)
    with EngineProcess(spec_b) as b:
        (first,) = b.generate([Prompt(PROMPT_B)], MAX_TOKENS).requests
        (again,) = b.generate([Prompt(PROMPT_B)], MAX_TOKENS).requests

    assert first.num_cached_tokens == 2 * BLOCK  # the hit was claimed, the load failed verification
    assert first.token_ids == expected[PROMPT_B]  # ... and vLLM recomputed instead of using it
    seg = PoolSegment.attach(name, writable=False)
    try:
        assert seg.counter("invalidated_blocks") == 1
    finally:
        seg.close()
    # B stored the recomputed blocks again: the service heals
    assert again.num_cached_tokens == 2 * BLOCK
    assert again.token_ids == expected[PROMPT_B]
    assert registered_hashes(coordinator) >= set(prefix_hashes())


def test_engine_serves_without_the_service_and_picks_it_up_again(
        tiny_model_dir, coordinator_factory, expected):
    coordinator = coordinator_factory()
    kv = connector_config(coordinator, timeout_s=2.0)
    with EngineProcess(EngineSpec(tiny_model_dir, kv_transfer_config=kv)) as a:
        a.generate([Prompt(PROMPT_A)], MAX_TOKENS)
    coordinator.kill()  # SIGKILL: the pool stays in /dev/shm, nothing answers

    spec_b = EngineSpec(tiny_model_dir, kv_transfer_config=kv, enable_prefix_caching=False)
    with EngineProcess(spec_b) as b:
        down = b.generate([Prompt(PROMPT_B)], MAX_TOKENS)
        (rb,) = down.requests
        assert rb.num_cached_tokens == 0
        assert rb.token_ids == expected[PROMPT_B]
        assert down.generate_s < 1.5  # no request to the dead service waited for its 2 s deadline

        coordinator_factory()  # the same instance again: it adopts the pool A filled
        deadline = time.monotonic() + 30
        while True:
            (rb,) = b.generate([Prompt(PROMPT_B)], MAX_TOKENS).requests
            if rb.num_cached_tokens or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert rb.num_cached_tokens == 2 * BLOCK
    assert rb.token_ids == expected[PROMPT_B]


def test_cache_salt_isolates_engines(tiny_model_dir, coordinator, expected):
    spec = EngineSpec(tiny_model_dir, kv_transfer_config=connector_config(coordinator))
    with EngineProcess(spec) as a:
        a.generate([Prompt(PROMPT_A, cache_salt="tenant-a")], MAX_TOKENS)
    assert registered_hashes(coordinator) == set(prefix_hashes("tenant-a"))

    with EngineProcess(spec) as b:
        (other,) = b.generate([Prompt(PROMPT_B, cache_salt="tenant-b")], MAX_TOKENS).requests
        (same,) = b.generate([Prompt(PROMPT_B, cache_salt="tenant-a")], MAX_TOKENS).requests
    assert other.num_cached_tokens == 0
    assert same.num_cached_tokens == 2 * BLOCK
    assert other.token_ids == same.token_ids == expected[PROMPT_B]


def test_generated_text_depends_on_the_loaded_kv(tiny_model_dir, coordinator, expected):
    """Verification off (`verify_checksums: false`), vLLM's prefix cache off: one engine serves the
    same prompt from the service three times while the prefix blocks' bytes in shm are the
    stored ones, then altered, then restored. The output follows the bytes: a connector that
    claimed the hit but loaded nothing (vLLM's blocks fresh, or stale from the request before)
    would give the same output every time."""
    unverified = connector_config(coordinator, verify_checksums=False)
    with EngineProcess(EngineSpec(tiny_model_dir, kv_transfer_config=unverified, enable_prefix_caching=False)) as engine:
        engine.generate([Prompt(PROMPT_A)], MAX_TOKENS)  # stores the prefix
        wait_for(lambda: registered_hashes(coordinator) >= set(prefix_hashes()), 30, "the prefix stored")
        name, records = pool_records(coordinator)
        block_ids = [int(np.flatnonzero(records["hash"] == np.void(h))[0]) for h in prefix_hashes()]
        seg = PoolSegment.attach(name)
        try:
            stored = [seg.block(b).copy() for b in block_ids]
            (original,) = engine.generate([Prompt(PROMPT_B)], MAX_TOKENS).requests
            for block_id in block_ids:
                data = seg.block(block_id).view(np.float32)
                data[:] = np.random.default_rng(block_id).standard_normal(data.shape, np.float32) * 3
            (altered,) = engine.generate([Prompt(PROMPT_B)], MAX_TOKENS).requests
            for block_id, data in zip(block_ids, stored):
                seg.block(block_id)[:] = data
            (restored,) = engine.generate([Prompt(PROMPT_B)], MAX_TOKENS).requests
        finally:
            seg.close()

    assert [r.num_cached_tokens for r in (original, altered, restored)] == [2 * BLOCK] * 3
    assert original.token_ids == restored.token_ids == expected[PROMPT_B]
    assert altered.token_ids != expected[PROMPT_B]


def test_lora_adapters_never_share_blocks(tiny_model_dir, coordinator, tmp_path):
    """One prompt under two adapters and none, in an engine whose own prefix cache is off, so
    that every hit comes from the service: only the adapter that stored the prefix finds it."""
    lora_a = ("adapter-a", 1, str(build_lora_dir(tmp_path / "a", tiny_model_dir, seed=1)))
    lora_b = ("adapter-b", 2, str(build_lora_dir(tmp_path / "b", tiny_model_dir, seed=2)))
    hashes_a, hashes_b = prefix_hashes(lora_name="adapter-a"), prefix_hashes(lora_name="adapter-b")
    assert not set(hashes_a) & (set(hashes_b) | set(prefix_hashes()))  # the salts differ

    spec = EngineSpec(tiny_model_dir, kv_transfer_config=connector_config(coordinator), enable_lora=True,
                      enable_prefix_caching=False)
    with EngineProcess(spec) as engine:
        (first,) = engine.generate([Prompt(PROMPT_A, lora=lora_a)], MAX_TOKENS).requests
        wait_for(lambda: registered_hashes(coordinator) == set(hashes_a), 30, "adapter a's prefix stored")
        (other,) = engine.generate([Prompt(PROMPT_B, lora=lora_b)], MAX_TOKENS).requests
        (base,) = engine.generate([Prompt(PROMPT_B)], MAX_TOKENS).requests
        (same,) = engine.generate([Prompt(PROMPT_B, lora=lora_a)], MAX_TOKENS).requests
    assert (first.num_cached_tokens, other.num_cached_tokens, base.num_cached_tokens) == (0, 0, 0)
    assert same.num_cached_tokens == 2 * BLOCK
    assert wait_for(lambda: registered_hashes(coordinator) == set(hashes_a) | set(hashes_b) | set(prefix_hashes()),
                    30, "each adapter's prefix stored under its own hashes")
    assert other.token_ids != same.token_ids  # the adapters do change the output
