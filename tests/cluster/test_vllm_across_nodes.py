"""A real vLLM engine on node B reuses a prefix that a vLLM engine on node A computed: the two
engines share nothing but the cluster (two coordinators, etcd, a NIXL read over UCX/TCP).

Runs in `.venv-vllm` with the cluster environment installed there (`make test-vllm` does both);
skips elsewhere. The reference output is HF transformers' greedy continuation.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvbm_shm import Client
from tests.engines.tiny_llama import prompt_token_ids
from tests.engines.vllm_runner import EngineProcess, EngineSpec, Prompt, hf_greedy

from ..procs import wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

BLOCK = 128  # vLLM's CPU block
MAX_TOKENS = 8
PREFIX = prompt_token_ids(2 * BLOCK, seed=21)
PROMPT_A = tuple(PREFIX + prompt_token_ids(40, seed=22))
PROMPT_B = tuple(PREFIX + prompt_token_ids(36, seed=23))
WARM_UP = tuple(prompt_token_ids(3 * BLOCK, seed=24))  # shares nothing with the prefix


def engine_spec(model_dir: str, node) -> EngineSpec:
    return EngineSpec(model_dir, kv_transfer_config={
        "kv_connector": "KvbmShmConnector", "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
        "kv_connector_module_path": "kvbm_shm.integrations.vllm",
        "kv_connector_extra_config": {"instance": node.instance, "runtime_dir": str(node.runtime_dir)}})


def g4(node) -> dict:
    with Client(instance=node.instance, runtime_dir=node.runtime_dir, name="observer", timeout_s=20) as c:
        return c.stats().tiers["g4"]


def test_an_engine_on_b_reuses_a_prefix_computed_on_a(tiny_model_dir, cluster):
    expected_b = hf_greedy(tiny_model_dir, PROMPT_B, MAX_TOKENS)
    a, b = cluster.start("a", cpu_cache_gb=0.25), cluster.start("b", cpu_cache_gb=0.25)

    with EngineProcess(engine_spec(tiny_model_dir, a)) as engine_a:
        (ra,) = engine_a.generate([Prompt(PROMPT_A)], MAX_TOKENS).requests
    assert ra.num_cached_tokens == 0
    wait_for(lambda: g4(b)["nodes"].get("a", {}).get("index_blocks") == 2, 30, "A's 2 prefix blocks in B's index")

    with EngineProcess(engine_spec(tiny_model_dir, b)) as engine_b:
        # B's pool exists once its engine registered its KV layout; a remote hit needs it registered
        # with B's NIXL agent (a lookup before that is a miss, never a wrong block)
        (warm,) = engine_b.generate([Prompt(WARM_UP)], MAX_TOKENS).requests
        assert warm.num_cached_tokens == 0
        wait_for(lambda: g4(b)["registered_pools"] == 1, 30, "B's pool registered with NIXL")
        (rb,) = engine_b.generate([Prompt(PROMPT_B)], MAX_TOKENS).requests

    assert rb.num_cached_tokens == 2 * BLOCK
    assert rb.token_ids == expected_b
    assert g4(b)["counters"]["remote_hit_blocks"] == 2
    assert g4(a)["counters"]["served_blocks"] == 2
