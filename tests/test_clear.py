"""`Clear` (`Client.clear`, `kvbm-shm clear`) against a real coordinator: every Registered block of
the chosen pools goes, a pinned one when its last pin goes, each drop is a `removed` KV event,
other pools are untouched, and the engines keep storing and loading afterwards."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvbm_shm import protocol as p, runtime
from kvbm_shm.errors import ErrorCode, RequestError
from kvbm_shm.observe.events import EventStream
from kvbm_shm.shm import PoolSegment

from . import engine


def _two_pools(client):
    kv_a, kv_b = engine.make_kv(1), engine.make_kv(2)
    ns_a, ns_b = engine.namespace(kv_a, model="model-alpha"), engine.namespace(kv_b, model="model-beta")
    pool_a = client.register_layout(ns_a, cache_bytes=PoolSegment.size_for(8, ns_a.kv.block_bytes))
    pool_b = client.register_layout(ns_b, cache_bytes=PoolSegment.size_for(8, ns_b.kv.block_bytes))
    return (pool_a, pool_a.bind(kv_a)), (pool_b, pool_b.bind(kv_b))


def test_clear_one_model_drops_its_blocks_announces_them_and_keeps_the_rest(coordinator, instance, runtime_dir):
    a_hashes, b_hashes = engine.prompt_hashes(4, start=0), engine.prompt_hashes(3, start=5000)
    endpoint = runtime.read_info(runtime_dir / instance).events_endpoint
    with engine.connect(instance, runtime_dir) as client, EventStream(endpoint) as events:
        (pool_a, kv_a), (pool_b, kv_b) = _two_pools(client)
        assert client.store(kv_a, a_hashes, [0, 1, 2, 3]).stored == 4
        assert client.store(kv_b, b_hashes, [0, 1, 2]).stored == 3
        pinned = client.lookup(pool_a, a_hashes[:1], pin=True)

        assert client.clear(model="alpha") == 4
        assert client.lookup(pool_a, a_hashes) == []
        assert len(client.lookup(pool_b, b_hashes)) == 3
        stats = {s.pool_id: s for s in client.stats().pools}
        assert (stats[pool_a.pool_id].registered, stats[pool_a.pool_id].free) == (0, pool_a.num_blocks - 1)
        client.release(pool_a, pinned)  # the pinned block goes with its last pin
        stats = {s.pool_id: s for s in client.stats().pools}
        assert stats[pool_a.pool_id].free == pool_a.num_blocks
        assert stats[pool_b.pool_id].registered == 3

        removed: list[bytes] = []
        while len(removed) < 4:
            got = events.receive(timeout_s=5)
            assert got is not None, f"only {len(removed)} removed hashes announced"
            removed += [h for e in got.batch.events if isinstance(e, p.BlockRemoved) and e.pool_id == pool_a.pool_id
                        for h in e.hashes]
        assert sorted(removed) == sorted(a_hashes)

        # the cache fills again
        assert client.store(kv_a, a_hashes, [0, 1, 2, 3]).stored == 4
        assert client.load(kv_a, a_hashes, [3, 2, 1, 0]).loaded == 4
        assert client.clear(pool_a) == 4
        assert client.clear() == 3  # every pool: only B's blocks were left
        assert client.clear(model="no-such-model") == 0


def test_clear_of_an_unknown_pool_is_a_typed_error(coordinator, instance, runtime_dir):
    with engine.connect(instance, runtime_dir) as client:
        with pytest.raises(RequestError) as e:
            client.request(p.Clear(req=0, lease=client.lease, pool_id=7))
        assert e.value.code == ErrorCode.UNKNOWN_POOL


def test_clear_command(coordinator, instance, runtime_dir):
    hashes = engine.prompt_hashes(2, start=0)
    with engine.connect(instance, runtime_dir) as client:
        (pool_a, kv_a), (pool_b, kv_b) = _two_pools(client)
        client.store(kv_a, hashes, [0, 1])
        client.store(kv_b, hashes, [0, 1])
    command = [sys.executable, "-m", "kvbm_shm", "clear", instance, "--runtime-dir", str(runtime_dir)]
    out = subprocess.run([*command, "--model", "beta"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"cleared 2 block(s) of the pools whose model contains 'beta' from instance {instance}\n"
    out = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"cleared": 2}
    missing = subprocess.run([sys.executable, "-m", "kvbm_shm", "clear", instance + "x", "--runtime-dir",
                              str(runtime_dir)], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stdout == ""
