"""HF transformers through the client library: one process stores the prefix KV of a tiny
LlamaForCausalLM as blocks, another loads them into its own tensors, rebuilds a DynamicCache and
continues: its logits are bit-identical to a full forward.

The "engine tensors" are per-layer K and V tensors `(num_blocks, kv_heads, page, head_dim)`; the
two processes put the same blocks at different device block ids, so the test also checks that
every block lands where it was asked to.
"""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("transformers")

from kvbm_shm.client import Client
from kvbm_shm.config import ClientConfig
from kvbm_shm.hashing import sequence_hashes
from kvbm_shm.layout import EngineLayout, KvLayout, Namespace
from tests.engines.tiny_llama import SIZES, prompt_token_ids
from tests.procs import run_child

PAGE = 16
NUM_DEVICE_BLOCKS = 8
PROMPT = prompt_token_ids(5 * PAGE + 9, seed=21)
PREFIX_BLOCKS = 4  # the stored prefix: 64 tokens; the rest is computed on top of it


def _model(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _device_tensors() -> list:
    import torch

    shape = SIZES["tiny"]
    per_block = (NUM_DEVICE_BLOCKS, shape.num_key_value_heads, PAGE, shape.head_dim)
    return [torch.zeros(per_block) for _ in range(2 * shape.num_hidden_layers)]  # K0, V0, K1, V1


def _namespace(model_dir: str) -> Namespace:
    shape = SIZES["tiny"]
    tensors = _device_tensors()
    return Namespace(
        model=f"hf:{model_dir}",
        kv=KvLayout(num_layers=shape.num_hidden_layers, outer_dim=2, page_size=PAGE,
                    inner_dim=shape.num_key_value_heads * shape.head_dim, dtype="float32"),
        engine_layout=EngineLayout.of(tensors, block_axis=0),
    )


def store_prefix(model_dir: str, config: ClientConfig, device_ids: list[int]) -> int:
    """Child A: forward the prefix, scatter its KV into device blocks, store them."""
    import torch

    prefix = PROMPT[:PREFIX_BLOCKS * PAGE]
    with torch.no_grad():
        cache = _model(model_dir)(torch.tensor([prefix]), use_cache=True).past_key_values
    tensors = _device_tensors()
    for layer, kv in enumerate(cache.layers):
        for j, b in enumerate(device_ids):
            tokens = slice(j * PAGE, (j + 1) * PAGE)
            tensors[2 * layer][b] = kv.keys[0, :, tokens]
            tensors[2 * layer + 1][b] = kv.values[0, :, tokens]
    with Client(config) as client:
        kv = client.register_layout(_namespace(model_dir)).bind(tensors)
        return client.store(kv, sequence_hashes(prefix, PAGE), device_ids).stored


def load_and_continue(model_dir: str, config: ClientConfig, device_ids: list[int]) -> tuple[int, bool, float]:
    """Child B: load the prefix blocks, rebuild a DynamicCache, forward the rest of the prompt."""
    import torch
    from transformers import DynamicCache

    prefix = PROMPT[:PREFIX_BLOCKS * PAGE]
    tensors = _device_tensors()
    with Client(config) as client:
        kv = client.register_layout(_namespace(model_dir)).bind(tensors)
        loaded = client.load(kv, sequence_hashes(prefix, PAGE), device_ids).loaded
    cache = DynamicCache()
    for layer in range(len(tensors) // 2):
        keys = torch.cat([tensors[2 * layer][b] for b in device_ids], dim=1)[None]
        values = torch.cat([tensors[2 * layer + 1][b] for b in device_ids], dim=1)[None]
        cache.update(keys, values, layer)
    model = _model(model_dir)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        continued = model(torch.tensor([PROMPT[len(prefix):]]), **{cache_arg: cache}).logits
        full = model(torch.tensor([PROMPT])).logits[:, len(prefix):]
    return loaded, torch.equal(continued, full), float((continued - full).abs().max())


def test_prefix_kv_stored_by_one_process_continues_bit_identically_in_another(
        tiny_model_dir, coordinator):
    config = ClientConfig(instance=coordinator.instance, runtime_dir=coordinator.runtime_dir)

    stored = run_child(store_prefix, tiny_model_dir, config, [5, 2, 7, 0], timeout_s=120)
    loaded, identical, max_diff = run_child(load_and_continue, tiny_model_dir, config, [1, 3, 4, 6],
                                            timeout_s=120)

    assert stored == PREFIX_BLOCKS
    assert loaded == PREFIX_BLOCKS
    assert identical, f"logits differ by up to {max_diff}"
