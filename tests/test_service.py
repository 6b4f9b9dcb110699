"""The coordinator as a real process, with real engine processes sharing it.

Each test starts `kvbm-shm serve` for a unique instance, drives it from spawned children and
checks exact state through `stats`; the fixtures assert nothing is left in /dev/shm.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgspec
import pytest
import zmq

from kvbm_shm import CoordinatorUnavailable, protocol as p, runtime
from kvbm_shm.errors import CapacityError, ErrorCode, KvbmError, LeaseError, RequestError

from . import engine
from .procs import CoordinatorProcess, run_child, start_child



def test_one_engine_stores_another_loads_identical_bytes(coordinator, instance, runtime_dir):
    stored, result = run_child(engine.store_prefix, instance, runtime_dir, 4, 7, [5, 9, 2, 30])
    assert result.stored == 4
    loaded, load = run_child(engine.load_prefix, instance, runtime_dir, 4, [0, 1, 2, 3])
    assert load.loaded == 4 and load.failed == [] and load.tiers == [p.Tier.CPU] * 4
    assert loaded == stored
    s = engine.stats_of(instance, runtime_dir)
    pool = s.pools[0]
    assert (pool.registered, pool.pinned, pool.partial) == (4, 0, 0)
    assert pool.counters["stored_blocks"] == 4


def test_same_prefix_stored_twice_is_deduplicated(coordinator, instance, runtime_dir):
    _, first = run_child(engine.store_prefix, instance, runtime_dir, 3, 1, [0, 1, 2])
    _, second = run_child(engine.store_prefix, instance, runtime_dir, 3, 2, [3, 4, 5])
    assert (first.stored, first.present) == (3, 0)
    assert (second.stored, second.present) == (0, 3)
    pool = engine.stats_of(instance, runtime_dir).pools[0]
    assert pool.registered == 3 and pool.counters["dedup_blocks"] == 3
    loaded, _ = run_child(engine.load_prefix, instance, runtime_dir, 3, [0, 1, 2])
    assert loaded == [engine.block_bytes(engine.make_kv(1), b) for b in (0, 1, 2)]


def small_pool_client(instance, runtime_dir, blocks: int):
    kv = engine.make_kv(3)
    client = engine.connect(instance, runtime_dir)
    ns = engine.namespace(kv)
    pool = client.register_layout(ns, cache_bytes=_pool_bytes(ns, blocks))
    assert pool.num_blocks == blocks
    return client, pool, pool.bind(kv)


def _pool_bytes(ns, blocks):
    from kvbm_shm.shm import PoolSegment
    return PoolSegment.size_for(blocks, ns.kv.block_bytes)


def test_eviction_order_and_pins_under_pressure(coordinator, instance, runtime_dir):
    client, pool, kv = small_pool_client(instance, runtime_dir, 4)
    with client:
        a, b, c, d, e, f = (engine.prompt_hashes(1, start=1000 * i) for i in range(6))
        for h in (a, b, c, d):
            assert client.store(kv, h, [0]).stored == 1
        client.touch(pool, a, priority=10)  # a outranks everything
        pinned = client.lookup(pool, b, pin=True)  # b is pinned
        client.lookup(pool, c)  # c is now more recent than d
        assert client.store(kv, e, [0]).stored == 1  # evicts d (LRU among unpinned priority 0)
        assert client.lookup(pool, d) == []
        assert client.store(kv, f, [0]).stored == 1  # evicts c
        assert client.lookup(pool, c) == []
        assert [len(client.lookup(pool, h)) for h in (a, b, e, f)] == [1, 1, 1, 1]
        g = engine.prompt_hashes(1, start=9000)
        client.lookup(pool, e + f, pin=False)
        client.lookup(pool, e, pin=True)
        client.lookup(pool, f, pin=True)
        # everything but a (priority 10) is pinned: a goes, then there is no room
        assert client.store(kv, g, [0]).stored == 1
        assert client.lookup(pool, a) == []
        client.lookup(pool, g, pin=True)
        assert client.store(kv, engine.prompt_hashes(1, start=9500), [0]).no_room == 1
        client.release(pool, pinned)
        assert client.store(kv, engine.prompt_hashes(1, start=9500), [0]).stored == 1
        assert client.lookup(pool, b) == []


def test_killed_client_loses_pins_and_unfinished_blocks(coordinator, instance, runtime_dir, tmp_path):
    run_child(engine.store_prefix, instance, runtime_dir, 3, 5, [0, 1, 2])
    ready = tmp_path / "ready"
    child = start_child(engine.pin_and_hang, instance, runtime_dir, 3, str(ready), timeout_s=30)
    deadline = time.monotonic() + 20
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists(), "child never became ready"
    pool = engine.stats_of(instance, runtime_dir).pools[0]
    assert (pool.pinned, pool.partial) == (3, 2)
    os.kill(child.pid, signal.SIGKILL)
    child.kill()
    deadline = time.monotonic() + 5  # lease is 1 s; a dead pid is noticed sooner
    while time.monotonic() < deadline:
        pool = engine.stats_of(instance, runtime_dir).pools[0]
        if (pool.pinned, pool.partial) == (0, 0):
            break
        time.sleep(0.05)
    assert (pool.pinned, pool.partial, pool.registered) == (0, 0, 3)
    assert pool.free == pool.num_blocks - 3


def test_silent_client_lease_expires(coordinator, instance, runtime_dir):
    """A client that stops talking (no pid to check) loses its lease after lease_ms."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(runtime.read_info(runtime_dir / instance).endpoint)
    s.send_multipart(p.encode(p.Hello(req=1, name="silent", pid=0)))
    hello = p.decode_reply(s.recv_multipart())
    assert hello.client_id in [c.client_id for c in engine.stats_of(instance, runtime_dir).clients]
    time.sleep(1.5)
    assert "silent" not in [c.name for c in engine.stats_of(instance, runtime_dir).clients]
    s.send_multipart(p.encode(p.Heartbeat(req=2, lease=hello.lease)))
    reply = p.decode_reply(s.recv_multipart())
    assert isinstance(reply, p.ErrorReply) and reply.code == ErrorCode.UNKNOWN_LEASE
    s.close(0)
    ctx.term()


BAD_FRAMES = [
    ("random bytes", [os.urandom(64)]),
    ("random body", [p.VERSION_FRAME, os.urandom(200)]),
    ("truncated body",
     [p.VERSION_FRAME, p.encode(p.Lookup(req=5, lease=bytes(16), pool_id=0, hashes=[b"x" * 16]))[1][:-7]]),
    ("wrong version", [b"kvbm/99", p.encode(p.Stats(req=6))[1]]),
    ("unknown op", [p.VERSION_FRAME, msgspec.msgpack.encode(["explode", 7])]),
    ("wrong types", [p.VERSION_FRAME, msgspec.msgpack.encode(["lookup", 8, "me", 0, [], False])]),
    ("only a version", [p.VERSION_FRAME]),
    ("huge frame", [p.VERSION_FRAME, b"\0" * (65 << 20)]),
]


@pytest.mark.parametrize("what,frames", BAD_FRAMES, ids=[b[0] for b in BAD_FRAMES])
def test_malformed_frames_get_error_replies_and_service_goes_on(coordinator, instance, runtime_dir, what, frames):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(runtime.read_info(runtime_dir / instance).endpoint)
    s.send_multipart(frames)
    assert s.poll(5000), f"no reply to {what}"
    reply = p.decode_reply(s.recv_multipart())
    assert isinstance(reply, p.ErrorReply)
    expected = {"wrong version": ErrorCode.BAD_VERSION, "unknown op": ErrorCode.UNKNOWN_OP,
                "huge frame": ErrorCode.FRAME_TOO_LARGE, "wrong types": ErrorCode.BAD_REQUEST}
    if what in expected:
        assert reply.code == expected[what], reply.message
    if what in ("wrong version", "unknown op", "wrong types"):
        assert reply.req == {"wrong version": 0, "unknown op": 7, "wrong types": 8}[what] or what == "wrong version"
    s.close(0)
    ctx.term()
    stored, result = run_child(engine.store_prefix, instance, runtime_dir, 2, 3, [0, 1])
    assert result.stored == 2


def test_bad_requests_are_typed_errors(coordinator, instance, runtime_dir):
    client, pool, kv = small_pool_client(instance, runtime_dir, 8)
    with client:
        ids = client.lookup(pool, [])
        assert ids == []
        with pytest.raises(RequestError) as e:
            client.release(pool, [3])
        assert e.value.code == ErrorCode.NOT_PINNED
        with pytest.raises(RequestError) as e:
            client.release(pool, [10_000])
        assert e.value.code == ErrorCode.UNKNOWN_BLOCK
        with pytest.raises(RequestError) as e:
            client.request(p.Commit(req=0, lease=client.lease, pool_id=pool.pool_id, block_ids=[1], checksums=[0]))
        assert e.value.code == ErrorCode.NOT_OWNER
        with pytest.raises(RequestError) as e:
            client.request(p.Lookup(req=0, lease=client.lease, pool_id=99, hashes=[]))
        assert e.value.code == ErrorCode.UNKNOWN_POOL
        with pytest.raises(KvbmError, match="<= 32767") as e:
            client.request(p.Touch(req=0, lease=client.lease, pool_id=pool.pool_id, hashes=[], priority=2**15))
        assert e.value.code == ErrorCode.BAD_REQUEST
        with pytest.raises(KvbmError, match=">= 0"):
            client.request(p.Commit(req=0, lease=client.lease, pool_id=pool.pool_id, block_ids=[1], checksums=[-1]))
        with pytest.raises(KvbmError, match="length >= 16"):
            client.request(p.Lookup(req=0, lease=client.lease, pool_id=pool.pool_id, hashes=[b"short"]))
        with pytest.raises(LeaseError):
            client.request(p.Heartbeat(req=0, lease=bytes(16)))
        # another client's unfinished block cannot be committed by us
        other = engine.connect(instance, runtime_dir, "other")
        other_pool = other.register_layout(pool.namespace)
        got = other.request(p.Allocate(req=0, lease=other.lease, pool_id=other_pool.pool_id,
                                  hashes=engine.prompt_hashes(1, start=77)))
        with pytest.raises(RequestError) as e:
            client.request(p.Commit(req=0, lease=client.lease, pool_id=pool.pool_id, block_ids=got.block_ids,
                                    checksums=[0]))
        assert e.value.code == ErrorCode.NOT_OWNER
        other.close()
        assert engine.stats_of(instance, runtime_dir).pools[0].partial == 0  # goodbye freed it


def test_budget_exhausted_is_a_typed_error(coordinator, instance, runtime_dir):
    kv = engine.make_kv(0)
    with engine.connect(instance, runtime_dir) as client:
        client.register_layout(engine.namespace(kv, "model-a"))  # takes the whole budget (tp_size 1)
        with pytest.raises(CapacityError, match="budget exhausted"):
            client.register_layout(engine.namespace(kv, "model-b"))
        assert len(client.stats().pools) == 1


def test_shm_too_small_at_startup_is_a_clear_error(instance, runtime_dir):
    coord = CoordinatorProcess(instance, runtime_dir, cpu_cache_gb=100_000)
    with pytest.raises(RuntimeError) as e:
        coord.start()
    assert "/dev/shm has" in str(e.value) and "lower --cpu-cache-gb" in str(e.value)
    assert "Traceback" not in str(e.value)
    assert coord.proc.returncode == 2
    assert coord.segments() == []


def test_second_coordinator_refused_dead_one_taken_over_with_its_cache(coordinator_factory, instance, runtime_dir):
    first = coordinator_factory()
    second = CoordinatorProcess(instance, runtime_dir)
    with pytest.raises(RuntimeError, match="already running"):
        second.start()
    stored, _ = run_child(engine.store_prefix, instance, runtime_dir, 3, 11, [0, 1, 2])
    first.kill()  # SIGKILL: segments stay behind
    assert first.segments() == [f"kvbm-{instance}-pool-0"]
    coordinator_factory()  # takes over and adopts the pool
    loaded, result = run_child(engine.load_prefix, instance, runtime_dir, 3, [0, 1, 2])
    assert result.loaded == 3 and loaded == stored


def test_client_survives_coordinator_restart(coordinator_factory, instance, runtime_dir):
    first = coordinator_factory()
    kv = engine.make_kv(4)
    client = engine.connect(instance, runtime_dir, timeout_s=2.0)
    pool = client.register_layout(engine.namespace(kv))
    bound = pool.bind(kv)
    hashes = engine.prompt_hashes(2)
    assert client.store(bound, hashes, [0, 1]).stored == 2
    first.stop()
    with pytest.raises(CoordinatorUnavailable):
        client.lookup(pool, hashes)
    coordinator_factory()
    assert client.lookup(pool, hashes) == []  # clean stop: the cache went with it
    assert client.store(bound, hashes, [0, 1]).stored == 2
    assert len(client.lookup(pool, hashes)) == 2
    client.close()


def test_events_are_published_in_sequence(coordinator, instance, runtime_dir):
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, p.EVENTS_TOPIC)
    sub.connect(runtime.read_info(runtime_dir / instance).events_endpoint)
    time.sleep(0.3)  # slow joiner
    client, pool, kv = small_pool_client(instance, runtime_dir, 2)
    with client:
        h = engine.prompt_hashes(3)
        client.store(kv, h[:2], [0, 1])
        client.store(kv, h[2:], [2])  # evicts the oldest
    batches = []
    while sub.poll(1000):
        batches.append(p.decode_events(sub.recv_multipart()))
    events = [e for b in batches for e in b.events]
    assert [b.seq for b in batches] == list(range(1, len(batches) + 1))
    stored = [hh for e in events if isinstance(e, p.BlockStored) for hh in e.hashes]
    removed = [hh for e in events if isinstance(e, p.BlockRemoved) for hh in e.hashes]
    assert stored == h and removed == [h[0]]
    coordinator.stop()  # a clean stop empties the pools: subscribers are told
    assert sub.poll(5000)
    last = p.decode_events(sub.recv_multipart())
    assert last.seq == batches[-1].seq + 1
    assert [type(e) for e in last.events] == [p.PoolCleared]
    sub.close(0)
    ctx.term()


def test_async_client_same_flow(coordinator, instance, runtime_dir):
    import asyncio

    from kvbm_shm import AsyncClient

    async def main():
        kv = engine.make_kv(8)
        client = await AsyncClient.connect(instance=instance, runtime_dir=runtime_dir)
        pool = await client.register_layout(engine.namespace(kv))
        h = engine.prompt_hashes(3)
        assert (await client.store(pool.bind(kv), h, [4, 5, 6])).stored == 3
        dst = engine.make_kv(None)
        result = await client.load(pool.bind(dst), h, [0, 1, 2])
        await client.close()
        return result, [engine.block_bytes(dst, b) for b in (0, 1, 2)], [engine.block_bytes(kv, b) for b in (4, 5, 6)]

    result, got, want = asyncio.run(main())
    assert result.loaded == 3 and got == want


def test_corrupted_block_is_never_served(coordinator, instance, runtime_dir):
    stored, _ = run_child(engine.store_prefix, instance, runtime_dir, 3, 12, [0, 1, 2])
    kv = engine.make_kv(None)
    with engine.connect(instance, runtime_dir) as client:
        pool = client.register_layout(engine.namespace(kv))
        victim = client.lookup(pool, engine.prompt_hashes(3))[1]
        pool.block(victim)[123] ^= 0xFF  # bytes changed behind the service's back
        result = client.load(pool.bind(kv), engine.prompt_hashes(3), [0, 1, 2])
        assert (result.loaded, result.failed) == (1, [1])  # device blocks 1 and 2 count as not loaded
        assert engine.block_bytes(kv, 0) == stored[0]
        assert len(client.lookup(pool, engine.prompt_hashes(3))) == 1  # dropped from the cache
        again = client.load(pool.bind(kv), engine.prompt_hashes(3), [0, 1, 2])
        assert (again.loaded, again.failed) == (1, [])  # now a plain miss


def test_clean_shutdown_removes_everything(coordinator, instance, runtime_dir):
    run_child(engine.store_prefix, instance, runtime_dir, 1, 1, [0])
    assert coordinator.segments()
    assert coordinator.stop() == 0
    assert coordinator.segments() == []
    assert not (runtime_dir / instance).exists()


def test_config_from_toml_and_env(instance, runtime_dir, tmp_path):
    cfg = tmp_path / "kvbm.toml"
    cfg.write_text(f'[kvbm]\ninstance = "{instance}"\ncpu_cache_gb = 0.03\nlease_ms = 700\n')
    env = {**os.environ, "KVBM_RUNTIME_DIR": str(runtime_dir), "KVBM_LEASE_MS": "900"}
    proc = subprocess.Popen([sys.executable, "-m", "kvbm_shm", "serve", "--config", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while runtime.read_info(runtime_dir / instance) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with engine.connect(instance, runtime_dir) as client:
            assert client.lease_ms == 900  # env beats the file
            assert client.stats().cpu_cache_bytes == int(0.03 * 2**30)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0, out
    assert "endpoint ipc://" in out


def test_unknown_config_key_is_refused(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("cpu_cache_gigs = 3\n")
    out = subprocess.run([sys.executable, "-m", "kvbm_shm", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "unknown configuration keys: cpu_cache_gigs" in out.stderr
