"""A small CPU "engine" for tests: KV tensors in the vLLM CPU layout, filled deterministically,
and the functions that spawned engine processes run."""

from __future__ import annotations

import os
import time

import torch

from kvbm_shm import Client, EngineLayout, KvLayout, Namespace, sequence_hashes
from kvbm_shm import protocol

LAYERS, HEADS, PAGE, HEAD_DIM, DEVICE_BLOCKS = 2, 2, 16, 32, 32


def make_kv(seed: int | None = None) -> list[torch.Tensor]:
    """Per-layer tensors (num_blocks, kv_heads, block_size, 2*head_dim); random if seeded, else zero."""
    shape = (DEVICE_BLOCKS, HEADS, PAGE, 2 * HEAD_DIM)
    if seed is None:
        return [torch.zeros(shape) for _ in range(LAYERS)]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(LAYERS)]


def namespace(kv: list[torch.Tensor], model: str = "tiny-test") -> Namespace:
    return Namespace(model, KvLayout(LAYERS, 2, PAGE, HEADS * HEAD_DIM, "float32"), EngineLayout.of(kv))


def prompt_hashes(num_blocks: int, start: int = 0, salt: bytes | None = None) -> list[bytes]:
    tokens = list(range(start, start + num_blocks * PAGE))
    return sequence_hashes(tokens, PAGE, salt=salt)


def block_bytes(kv: list[torch.Tensor], block_id: int) -> bytes:
    return b"".join(t[block_id].numpy().tobytes() for t in kv)


def connect(instance: str, runtime_dir, name: str = "engine", **kw) -> Client:
    """A test client; its deadline is generous because CI machines are small and shared."""
    return Client(instance=instance, runtime_dir=runtime_dir, name=name, **{"timeout_s": 20.0, **kw})


def stats_of(instance: str, runtime_dir) -> protocol.StatsReply:
    with connect(instance, runtime_dir, "observer") as c:
        return c.stats()


def store_prefix(instance, runtime_dir, num_blocks: int, seed: int, device_ids: list[int]):
    """Engine A: stores `num_blocks` blocks; returns their bytes and the store result."""
    kv = make_kv(seed)
    with connect(instance, runtime_dir, "engine-a") as client:
        pool = client.register_layout(namespace(kv))
        result = client.store(pool.bind(kv), prompt_hashes(num_blocks), device_ids)
        return [block_bytes(kv, b) for b in device_ids], result


def load_prefix(instance, runtime_dir, num_blocks: int, device_ids: list[int]):
    """Engine B: loads the prefix into its own (zeroed) tensors; returns the loaded bytes."""
    kv = make_kv(None)
    with connect(instance, runtime_dir, "engine-b") as client:
        pool = client.register_layout(namespace(kv))
        result = client.load(pool.bind(kv), prompt_hashes(num_blocks), device_ids)
        return [block_bytes(kv, b) for b in device_ids[:result.loaded]], result


def pin_and_hang(instance, runtime_dir, num_blocks: int, ready_path: str):
    """Pins a stored prefix, allocates blocks it never commits, then waits to be killed."""
    kv = make_kv(1)
    client = connect(instance, runtime_dir, "doomed")
    pool = client.register_layout(namespace(kv))
    client.lookup(pool, prompt_hashes(num_blocks), pin=True)
    client.request(protocol.Allocate(req=0, lease=client.lease, pool_id=pool.pool_id,
                                     hashes=prompt_hashes(2, start=10_000)))
    with open(ready_path, "w") as f:
        f.write(str(os.getpid()))
    while True:
        time.sleep(1)
