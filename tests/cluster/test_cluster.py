"""The cluster tier (G4) end to end: real etcd, real coordinators as separate nodes, NIXL reads
over UCX/TCP on loopback, and this test process as the engine on each node (numpy KV tensors,
the client library).

Stories: a block stored on node A is a hit on node B with the same bytes (tiers 4, then 2);
A killed mid-read is a miss within the deadline; A's lease expiring drops its entries from B's
index; etcd down then back; a block whose bytes on A no longer match its checksum is a miss on
B; a client without the cluster secret gets nothing from the TCP endpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import zmq

from kvbm_shm import Client, EngineLayout, KvLayout, Namespace, protocol as p, sequence_hashes
from kvbm_shm.shm import PoolSegment

from ..procs import wait_for

LAYERS, HEADS, PAGE, HEAD_DIM, DEVICE_BLOCKS = 2, 2, 16, 32, 64
HASHES = sequence_hashes(list(range(DEVICE_BLOCKS * PAGE)), PAGE)


class Engine:
    """An engine on one node: KV tensors whose device block i holds the block of HASHES[i]."""

    def __init__(self, node, seed: int = 0, pool_blocks: int = 128):
        rng = np.random.default_rng(seed)
        shape = (DEVICE_BLOCKS, HEADS, PAGE, 2 * HEAD_DIM)
        self.kv = [rng.standard_normal(shape, dtype=np.float32) for _ in range(LAYERS)]
        self.namespace = Namespace("cluster-test", KvLayout(LAYERS, 2, PAGE, HEADS * HEAD_DIM, "float32"),
                                   EngineLayout.of(self.kv))
        self.client = Client(instance=node.instance, runtime_dir=node.runtime_dir, name="engine", timeout_s=20)
        cache_bytes = PoolSegment.size_for(pool_blocks, self.namespace.kv.block_bytes) + 4096
        self.pool = self.client.register_layout(self.namespace, cache_bytes)
        self.bound = self.pool.bind(self.kv)

    def store(self, first: int, count: int):
        ids = list(range(first, first + count))
        return self.client.store(self.bound, [HASHES[i] for i in ids], ids)

    def load(self, first: int, count: int):
        """Load into fresh tensors; returns the result and whether every loaded block is identical."""
        out = [np.zeros_like(t) for t in self.kv]
        ids = list(range(first, first + count))
        result = self.client.load(self.pool.bind(out), [HASHES[i] for i in ids], ids)
        same = all(np.array_equal(out[layer][b], self.kv[layer][b])
                   for layer in range(LAYERS) for b in ids[:result.loaded])
        return result, same

    def g4(self) -> dict:
        return self.client.stats().tiers["g4"]

    def close(self) -> None:
        self.client.close()


def wait_index(engine: Engine, node: str, blocks: int, timeout_s: float = 20) -> dict:
    return wait_for(lambda: engine.g4()["nodes"].get(node, {}).get("index_blocks") == blocks and engine.g4(),
                    timeout_s, f"{blocks} blocks of node {node} in the remote index")


def test_a_stores_b_hits_with_the_same_bytes(cluster):
    a, b = cluster.start("a"), cluster.start("b")
    ea = Engine(a)
    assert ea.store(0, 16).stored == 16
    eb = Engine(b)  # the same tensors, never stored on B: loads into zeroed ones compare with them
    wait_index(eb, "a", 16)
    wait_for(lambda: eb.g4()["registered_pools"] == 1, 20, "B's pool registered with NIXL")
    result, same = eb.load(0, 16)
    assert (result.loaded, result.tiers, same) == (16, [p.Tier.CLUSTER] * 16, True)
    result, same = eb.load(0, 16)
    assert (result.loaded, result.tiers, same) == (16, [p.Tier.CPU] * 16, True)
    g4 = eb.g4()
    assert g4["counters"]["remote_hit_blocks"] == 16
    assert g4["counters"]["remote_hit_bytes"] == 16 * ea.namespace.kv.block_bytes
    ea.close(), eb.close()
