"""The ground the connector tests stand on: a real vLLM (CPU, fp32, eager) on the locally built
tiny Llama produces HF transformers' greedy output, and reports vLLM's own prefix-cache hits in
``num_cached_tokens``. No kvbm_shm involved."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from tests.engines.tiny_llama import prompt_token_ids
from tests.engines.vllm_runner import EngineProcess, EngineSpec, Prompt, hf_greedy

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

BLOCK = 128  # vLLM's block size on CPU
MAX_TOKENS = 8


def test_vllm_greedy_matches_hf_and_reports_its_own_prefix_hits(tiny_model_dir):
    first = prompt_token_ids(2 * BLOCK + 44, seed=1)
    # shares the first two full blocks with `first`, then diverges
    second = first[: 2 * BLOCK] + prompt_token_ids(30, seed=2)

    with EngineProcess(EngineSpec(tiny_model_dir)) as engine:
        (a,) = engine.generate([Prompt(tuple(first))], MAX_TOKENS).requests
        (b,) = engine.generate([Prompt(tuple(second))], MAX_TOKENS).requests

    assert a.num_cached_tokens == 0
    assert b.num_cached_tokens == 2 * BLOCK
    assert a.token_ids == hf_greedy(tiny_model_dir, first, MAX_TOKENS)
    assert b.token_ids == hf_greedy(tiny_model_dir, second, MAX_TOKENS)


def test_cache_salt_isolates_vllm_prefix_cache(tiny_model_dir):
    prompt = tuple(prompt_token_ids(2 * BLOCK + 10, seed=3))

    with EngineProcess(EngineSpec(tiny_model_dir)) as engine:
        results = [engine.generate([Prompt(prompt, cache_salt=salt)], 2).requests[0]
                   for salt in ("tenant-a", "tenant-b", "tenant-a")]

    assert [r.num_cached_tokens for r in results] == [0, 0, 2 * BLOCK]
    assert len({r.token_ids for r in results}) == 1
