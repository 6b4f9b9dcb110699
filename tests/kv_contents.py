"""Known pool contents for the observability tests, written through the real client library.

`Contents.fill(client, ...)` registers a small namespace (4 KiB blocks of 16 tokens), stores
`stored` blocks of one token chain from a numpy "device" tensor, and runs the lookups the tests
count on; every number the tools must print follows from the arguments.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kvbm_shm import protocol as p
from kvbm_shm.client import Client, EngineKv, Pool
from kvbm_shm.hashing import sequence_hashes
from kvbm_shm.layout import EngineLayout, KvLayout, Namespace
from kvbm_shm.shm import PoolSegment

PAGE = 16
BLOCK_BYTES = 2 * PAGE * 32 * 4  # 1 layer, K and V, 16 tokens, 32 floats
DEVICE_BLOCKS = 32


def namespace(model: str = "obs-test") -> Namespace:
    device = np.zeros((DEVICE_BLOCKS, 2, PAGE, 32), np.float32)
    return Namespace(model, KvLayout(1, 2, PAGE, 32, "float32"), EngineLayout.of([device], 0))


@dataclasses.dataclass
class Contents:
    client: Client
    pool: Pool
    kv: EngineKv
    hashes: list[bytes]
    device: np.ndarray

    @classmethod
    def fill(cls, client: Client, num_blocks: int = 16, stored: int = 8) -> "Contents":
        ns = namespace()
        pool = client.register_layout(ns, PoolSegment.size_for(num_blocks, BLOCK_BYTES) + 4096)
        device = np.random.default_rng(0).standard_normal((DEVICE_BLOCKS, 2, PAGE, 32)).astype(np.float32)
        kv = pool.bind([device])
        hashes = sequence_hashes(np.arange(PAGE * 12), PAGE)
        result = client.store(kv, hashes[:stored], list(range(stored)))
        assert result.stored == stored
        return cls(client, pool, kv, hashes, device)

    @staticmethod
    def chain(seed: int, num_blocks: int) -> list[bytes]:
        """Hashes of another token chain, distinct for every seed."""
        return sequence_hashes(np.arange(PAGE * num_blocks) + seed * 100_000, PAGE)

    def allocate_partial(self, index: int) -> int:
        """Leave one block Partial (allocated, never committed) under the client's lease."""
        reply = self.client.request(p.Allocate(req=0, lease=self.client.lease, pool_id=self.pool.pool_id,
                                               hashes=[self.hashes[index]]))
        assert reply.block_ids[0] >= 0
        return reply.block_ids[0]
