"""Leases, replies and bounds under attack (issue 9, cases 1, 4, 5, 7 and 14), against real
coordinator processes (and, for case 4, a hostile coordinator written here).

- 1: lease ids reused across a restart never make a client load another hash's bytes; a token
  the coordinator did not issue, or an earlier start issued, gets UNKNOWN_LEASE.
- 4: a coordinator that hands out block ids outside the pool, lists of the wrong length, bad
  tiers or a pool that does not match its segment gets a typed error; nothing is copied and the
  engine process lives. A block whose record does not name the requested hash is not loaded.
- 5: a client cannot act on another's lease; clients map the block table read-only; a client
  cannot invalidate good blocks, while a block with really corrupt bytes is dropped.
- 7: hello names, reasons and namespace descriptions have a maximum length; leases per process
  and in all, pools per instance and devices per lease are bounded (CAPACITY).
- 14: a pinned lookup that times out (the coordinator stalled, or the lookup waits for the disk
  tier) leaves no pin behind; a timeout does not take a ServiceLink down.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq

from kvbm_shm import AsyncClient, Client, protocol as p, runtime
from kvbm_shm.config import ClientConfig, ServiceConfig
from kvbm_shm.device.ipc import export_tensors
from kvbm_shm.errors import CapacityError, ConfigError, ErrorCode, KvbmError, RequestError
from kvbm_shm.integrations.service_link import ServiceLink
from kvbm_shm.kernels import cpu_copy
from kvbm_shm.shm import BlockState, PoolSegment, unlink
from kvbm_shm.device.standin import StandInKv

from .. import engine
from ..procs import CoordinatorProcess, run_child, wait_for
from ..test_disk_tier import DISK_GB, HASHES, Engine, worker_pids

HUGE_ID = 1099511627776



class RawPeer:
    """A bare DEALER speaking the protocol: what any local process can send."""

    def __init__(self, instance, runtime_dir):
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(runtime.read_info(Path(runtime_dir) / instance).endpoint)

    def ask(self, request, timeout_s: float = 5.0) -> p.Reply:
        self._sock.send_multipart(p.encode(request))
        assert self._sock.poll(timeout_s * 1000), f"no reply to {request!r}"
        return p.decode_reply(self._sock.recv_multipart())

    def hello(self, name: str = "raw", pid: int = 0) -> p.Reply:
        return self.ask(p.Hello(req=1, name=name, pid=pid))

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()


def load_into_zeros(client: Client, pool, hashes: list[bytes]):
    """Load `hashes` into device blocks 0.. of fresh zero tensors: (result, bytes per loaded block, all zero?)."""
    out = engine.make_kv(None)
    result = client.load(pool.bind(out), hashes, list(range(len(hashes))))
    loaded = [engine.block_bytes(out, b) for b in range(result.loaded)]
    untouched = all(not t[result.loaded:].any() for t in out)
    return result, loaded, untouched


# ---------------------------------------------------------------- case 1: leases across restarts


def test_restart_never_serves_another_hash_under_a_reused_client_id(coordinator_factory, instance, runtime_dir):
    coordinator = coordinator_factory(lease_ms=5000)
    kv_x, kv_y = engine.make_kv(1), engine.make_kv(2)
    x, y = engine.prompt_hashes(4), engine.prompt_hashes(4, start=50_000)
    a = engine.connect(instance, runtime_dir, "a", timeout_s=5)
    try:
        pool_a = a.register_layout(engine.namespace(kv_x))
        assert a.store(pool_a.bind(kv_x), x, [0, 1, 2, 3]).stored == 4
        old_token, old_id, old_segment = a.lease, a.client_id, pool_a.segment.segment_id
        coordinator.stop()  # clean stop: the pool is unlinked; A keeps its mapping of it
        coordinator_factory(lease_ms=5000)
        with engine.connect(instance, runtime_dir, "b", timeout_s=5) as b:
            assert b.client_id == old_id  # display ids restart: B has the number A had
            assert b.lease != old_token
            pool_b = b.register_layout(engine.namespace(kv_y))
            assert b.store(pool_b.bind(kv_y), y, [0, 1, 2, 3]).stored == 4

            # A's old token is unknown: A says hello again and re-maps the new segment before copying
            result, loaded, untouched = load_into_zeros(a, pool_a, x)
            assert (result.loaded, result.failed, untouched) == (0, [], True)  # X is gone: a miss
            assert a.lease not in (old_token, b.lease) and a.client_id != b.client_id
            assert pool_a.segment.segment_id != old_segment
            result, loaded, _ = load_into_zeros(a, pool_a, y)
            assert (result.loaded, result.failed) == (4, [])
            assert loaded == [engine.block_bytes(kv_y, i) for i in range(4)]  # Y's bytes, never X's
            clients = {c.name: c.client_id for c in b.stats().clients}
            assert clients == {"a": a.client_id, "b": b.client_id}
    finally:
        a.close()


def test_made_up_and_old_tokens_get_unknown_lease(coordinator_factory, instance, runtime_dir):
    coordinator = coordinator_factory()
    peer = RawPeer(instance, runtime_dir)
    try:
        hello = peer.hello()
        old = hello.lease
        assert len(old) == p.LEASE_TOKEN_BYTES and hello.client_id == 1
        for token in (os.urandom(16), bytes(16), old[:-1] + bytes([old[-1] ^ 1])):
            reply = peer.ask(p.Heartbeat(req=2, lease=token))
            assert isinstance(reply, p.ErrorReply) and reply.code == ErrorCode.UNKNOWN_LEASE
        reply = peer.ask(p.Lookup(req=3, lease=bytes(8), pool_id=0, hashes=[]))  # not even a token
        assert isinstance(reply, p.ErrorReply) and reply.code == ErrorCode.BAD_REQUEST
        assert isinstance(peer.ask(p.Heartbeat(req=4, lease=old)), p.OkReply)
    finally:
        peer.close()
    coordinator.stop()
    coordinator_factory()
    peer = RawPeer(instance, runtime_dir)
    try:
        again = peer.hello()
        assert again.client_id == hello.client_id and again.lease != old
        reply = peer.ask(p.Heartbeat(req=2, lease=old))  # issued by the earlier start
        assert isinstance(reply, p.ErrorReply) and reply.code == ErrorCode.UNKNOWN_LEASE
    finally:
        peer.close()


# ---------------------------------------------------------------- case 4: a hostile coordinator

NUM_BLOCKS = 8
H_REGISTERED = b"R" * 16  # what block 0's record names
H_OTHER = b"O" * 16  # a lookup the fake answers with block 0 anyway
H_PARTIAL = b"P" * 16  # block 1's record names it, but the block is still being written (Partial)


def _fake_answer(m, instance: str, segment: str, ns_fingerprint: str):
    """Replies of a coordinator that lies: scripted by the first byte of the request's first hash."""
    if isinstance(m, p.Hello):
        return p.HelloReply(req=m.req, client_id=1, lease=b"L" * 16, lease_ms=5000, instance=instance,
                            instance_id="fake", coordinator_pid=os.getpid(), events_endpoint="")
    if isinstance(m, p.RegisterLayout):
        honest = m.namespace.fingerprint == ns_fingerprint
        return p.PoolReply(req=m.req, pool_id=0, segment=segment, segment_id="f" * 32,
                           num_blocks=NUM_BLOCKS if honest else 1 << 20, block_bytes=m.namespace.kv.block_bytes)
    if isinstance(m, p.Lookup):
        kind = m.hashes[0][:1]
        if kind == b"k":  # a reply of another kind
            return p.AllocateReply(req=m.req, block_ids=[0])
        ids, tiers = {b"h": ([HUGE_ID], [2]), b"n": ([-1], [2]), b"t": ([0], [2, 2]), b"9": ([0], [9]),
                      b"l": ([0, 1], [2, 2]), b"P": ([1], [2])}.get(kind, ([0], [2]))
        return p.LookupReply(req=m.req, block_ids=ids, tiers=tiers)
    if isinstance(m, p.Allocate):
        ids = {b"h": [HUGE_ID, 1], b"d": [1, 1], b"s": [1]}.get(m.hashes[0][:1], [-7, 1])
        return p.AllocateReply(req=m.req, block_ids=ids)
    return p.OkReply(req=m.req)


def _serve_fake(endpoint: str, stop: threading.Event, answer) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    try:
        while not stop.is_set():
            if sock.poll(20):
                identity, *frames = sock.recv_multipart()
                sock.send_multipart([identity, *p.encode(answer(p.decode_request(frames)))])
    finally:
        sock.close(0)
        ctx.term()


def victim_of_fake(endpoint: str) -> dict:
    """An engine process talking to the fake: what each lie does to it (it must stay alive)."""
    kv = engine.make_kv(3)
    out: dict = {}
    with Client(endpoint=endpoint, name="victim", timeout_s=5) as client:
        pool = client.register_layout(engine.namespace(kv))
        try:
            client.register_layout(engine.namespace(kv, "pool-of-another-size"))
            out["pool"] = "accepted"
        except KvbmError as e:
            out["pool"] = (type(e).__name__, int(e.code))
        zeros = engine.make_kv(None)
        for case in ("h", "n", "t", "9", "l", "k"):
            try:
                out[f"load-{case}"] = client.load(pool.bind(zeros), [case.encode() * 16], [0])
            except KvbmError as e:
                out[f"load-{case}"] = (type(e).__name__, int(e.code))
        result = client.load(pool.bind(zeros), [H_OTHER], [0])
        out["load-other-hash"] = (result.loaded, result.failed)
        result = client.load(pool.bind(zeros), [H_PARTIAL], [0])
        out["load-partial"] = (result.loaded, result.failed)
        for case in ("h", "d", "s", "x"):
            try:
                out[f"store-{case}"] = client.store(pool.bind(kv), [case.encode() * 16, b"2" * 16], [1, 2])
            except KvbmError as e:
                out[f"store-{case}"] = (type(e).__name__, int(e.code))
        out["zeros untouched"] = all(not t.any() for t in zeros)
    return out


def test_lying_coordinator_gets_typed_errors_and_nothing_is_copied(instance, runtime_dir):
    ns = engine.namespace(engine.make_kv(None))
    name = f"kvbm-{instance}-pool-0"
    seg = PoolSegment.create(name, pool_id=0, num_blocks=NUM_BLOCKS, block_bytes=ns.kv.block_bytes,
                             instance=instance, segment_id="f" * 32, fingerprint=ns.fingerprint,
                             namespace=msgspec.msgpack.encode(ns))
    stop = threading.Event()
    endpoint = f"ipc://{runtime_dir}/fake.sock"
    fake = threading.Thread(target=_serve_fake, args=(
        endpoint, stop, lambda m: _fake_answer(m, instance, name, ns.fingerprint)), daemon=True)
    try:
        seg.index.lower_tiers = True  # the client asks the coordinator about every local miss: the lies reach it
        seg.table["hash"][0] = np.frombuffer(H_REGISTERED, "V16")[0]
        seg.table["checksum"][0] = cpu_copy.checksum(seg.block(0))
        seg.table["state"][0] = BlockState.REGISTERED
        seg.table["hash"][1] = np.frombuffer(H_PARTIAL, "V16")[0]
        seg.table["checksum"][1] = cpu_copy.checksum(seg.block(1))
        seg.table["state"][1] = BlockState.PARTIAL
        fake.start()
        out = run_child(victim_of_fake, endpoint, timeout_s=60)  # a SIGSEGV would fail here
        bad_reply = ("ProtocolError", int(ErrorCode.BAD_FRAME))
        assert out.pop("pool") == bad_reply
        for case in ("h", "n", "t", "9", "l", "k"):
            assert out.pop(f"load-{case}") == bad_reply, case
        assert out.pop("load-other-hash") == (0, [0])  # record names another hash: refused, not copied
        assert out.pop("load-partial") == (0, [0])  # not Registered: refused, not copied
        for case in ("h", "d", "s", "x"):
            assert out.pop(f"store-{case}") == bad_reply, case
        assert out == {"zeros untouched": True}
        assert not seg.data.any()  # no store wrote a byte
    finally:
        stop.set()
        fake.join(5)
        seg.close()
        unlink(name)


# ---------------------------------------------------------------- case 5: one client, another's lease


def test_a_client_cannot_act_on_another_clients_lease(coordinator, instance, runtime_dir):
    kv = engine.make_kv(5)
    hashes = engine.prompt_hashes(3)
    with engine.connect(instance, runtime_dir, "a") as a, engine.connect(instance, runtime_dir, "b") as b:
        pool = a.register_layout(engine.namespace(kv))
        a.store(pool.bind(kv), hashes, [0, 1, 2])
        pinned = a.lookup(pool, hashes, pin=True)
        allocate = p.Allocate(req=0, lease=a.lease, pool_id=pool.pool_id, hashes=engine.prompt_hashes(2, start=9_000))
        partial = a.request(allocate).block_ids
        b.register_layout(pool.namespace)
        refused = {
            "free": p.Free(req=0, lease=b.lease, pool_id=pool.pool_id, block_ids=partial),
            "commit": p.Commit(req=0, lease=b.lease, pool_id=pool.pool_id, block_ids=partial, checksums=[0, 0]),
            "release": p.Release(req=0, lease=b.lease, pool_id=pool.pool_id, block_ids=pinned),
        }
        codes = {}
        for what, request in refused.items():
            with pytest.raises(RequestError) as e:
                b.request(request)
            codes[what] = e.value.code
        assert codes == {"free": ErrorCode.NOT_OWNER, "commit": ErrorCode.NOT_OWNER, "release": ErrorCode.NOT_PINNED}
        # B cannot name A's lease at all: a cancel of A's request id under B's token undoes nothing
        assert b.request(p.Cancel(req=0, lease=b.lease, target=allocate.req)).count == 0
        assert b.request(p.Goodbye(req=0, lease=os.urandom(16))).count == 0
        stats = b.stats()
        (info,) = [c for c in stats.clients if c.name == "a"]
        assert (info.pins, info.pending) == (3, 2)
        assert (stats.pools[0].pinned, stats.pools[0].partial, stats.pools[0].registered) == (3, 2, 3)


def test_clients_map_the_block_table_read_only(coordinator, instance, runtime_dir):
    kv = engine.make_kv(6)
    with engine.connect(instance, runtime_dir) as client:
        pool = client.register_layout(engine.namespace(kv))
        client.store(pool.bind(kv), engine.prompt_hashes(2), [0, 1])
        seg = pool.segment
        with pytest.raises(ValueError, match="read-only"):
            seg.table["checksum"][0] = 0
        with pytest.raises(ValueError, match="read-only"):
            seg.header["num_blocks"] = 1 << 40
        seg.block(5)[:4] = 1  # block bytes stay writable (a client fills the blocks it allocated)
        seg.block(5)[:4] = 0
        fresh = PoolSegment.attach(seg.name, table_writable=False)
        try:
            with pytest.raises(TypeError, match="readonly"):
                fresh.segment.buf[HEADER_TABLE_PROBE:HEADER_TABLE_PROBE + 1] = b"x"
            with pytest.raises(ValueError, match="read-only"):
                fresh.table["state"][:] = BlockState.REGISTERED
            assert fresh.data.flags.writeable
        finally:
            fresh.close()


HEADER_TABLE_PROBE = 4096 + 8  # inside the first block record


def test_invalidate_drops_only_blocks_whose_bytes_really_fail(coordinator, instance, runtime_dir):
    kv = engine.make_kv(7)
    hashes = engine.prompt_hashes(4)
    with engine.connect(instance, runtime_dir) as client:
        pool = client.register_layout(engine.namespace(kv))
        client.store(pool.bind(kv), hashes, [0, 1, 2, 3])
        ids = client.lookup(pool, hashes)
        reply = client.request(p.Invalidate(req=0, lease=client.lease, pool_id=pool.pool_id, block_ids=ids,
                                            reason="a liar"))
        assert reply.count == 0
        assert client.lookup(pool, hashes) == ids
        assert "reported 4 block(s) of pool 0 bad whose bytes match their checksum: kept (a liar)" in coordinator.log()

        writer = PoolSegment.attach(pool.segment.name)  # a process of the coordinator's uid may write
        try:
            writer.block(ids[2])[100:108] = 0xEE
        finally:
            writer.close()
        result, loaded, untouched = load_into_zeros(client, pool, hashes)
        assert (result.loaded, result.failed) == (2, [2])
        assert loaded == [engine.block_bytes(kv, i) for i in range(2)]
        assert client.lookup(pool, hashes) == ids[:2]  # the corrupt block is gone
        stats = client.stats().pools[0]
        assert (stats.registered, stats.counters["invalidated_blocks"]) == (3, 1)


# ---------------------------------------------------------------- case 7: bounds


def test_names_reasons_and_namespaces_are_bounded(coordinator, instance, runtime_dir):
    peer = RawPeer(instance, runtime_dir)
    try:
        reply = peer.hello(name="n" * (p.MAX_NAME_BYTES + 1))
        assert isinstance(reply, p.ErrorReply) and reply.code == ErrorCode.BAD_REQUEST
        assert "length <= 256" in reply.message
        hello = peer.hello(name="n" * p.MAX_NAME_BYTES)
        assert isinstance(hello, p.HelloReply)
        reply = peer.ask(p.Invalidate(req=2, lease=hello.lease, pool_id=0, block_ids=[], reason="r" * 300))
        assert isinstance(reply, p.ErrorReply) and reply.code == ErrorCode.BAD_REQUEST
        reply = peer.ask(p.Invalidate(req=3, lease=hello.lease, pool_id=0, block_ids=list(range(65))))
        assert isinstance(reply, p.ErrorReply) and reply.code == ErrorCode.BAD_REQUEST
        huge = engine.namespace(engine.make_kv(None), model="m" * 3000)
        reply = peer.ask(p.RegisterLayout(req=4, lease=hello.lease, namespace=huge))
        assert isinstance(reply, p.ErrorReply) and reply.code == ErrorCode.BAD_REQUEST
        assert "at most 2048" in reply.message
    finally:
        peer.close()
    assert engine.stats_of(instance, runtime_dir).pools == []


def test_leases_per_process_and_in_all_are_bounded(coordinator_factory, instance, runtime_dir):
    coordinator_factory(env={"KVBM_MAX_LEASES": "5", "KVBM_MAX_LEASES_PER_PROCESS": "3"})
    peer = RawPeer(instance, runtime_dir)
    try:
        mine = [peer.hello(pid=os.getpid()) for _ in range(3)]
        assert all(isinstance(r, p.HelloReply) for r in mine)
        reply = peer.hello(pid=os.getpid())
        assert isinstance(reply, p.ErrorReply) and reply.code == ErrorCode.CAPACITY
        assert "max_leases_per_process" in reply.message
        assert all(isinstance(peer.hello(pid=os.getppid()), p.HelloReply) for _ in range(2))
        reply = peer.hello(pid=0)
        assert isinstance(reply, p.ErrorReply) and reply.code == ErrorCode.CAPACITY
        assert "max_leases)" in reply.message
        assert isinstance(peer.ask(p.Goodbye(req=9, lease=mine[0].lease)), p.OkReply)
        assert isinstance(peer.hello(pid=os.getpid()), p.HelloReply)  # room again
        with pytest.raises(CapacityError) as e:  # the client library gets the typed error
            engine.connect(instance, runtime_dir, "one-too-many")
        assert e.value.code == ErrorCode.CAPACITY
        assert isinstance(peer.ask(p.Stats(req=10)), p.StatsReply)  # and the service goes on
    finally:
        peer.close()


def test_pools_per_instance_are_bounded(coordinator_factory, instance, runtime_dir):
    coordinator_factory(env={"KVBM_MAX_POOLS": "2"})
    kv = engine.make_kv(None)
    small = PoolSegment.size_for(4, engine.namespace(kv).kv.block_bytes) + 4096
    with engine.connect(instance, runtime_dir) as client:
        for model in ("m1", "m2"):
            client.register_layout(engine.namespace(kv, model), small)
        with pytest.raises(CapacityError) as e:
            client.register_layout(engine.namespace(kv, "m3"), small)
        assert e.value.code == ErrorCode.CAPACITY and "max_pools" in str(e.value)
        assert client.register_layout(engine.namespace(kv, "m1"), small).pool_id == 0  # existing ones still served
        assert len(client.stats().pools) == 2


def test_devices_per_lease_are_bounded(coordinator, instance, runtime_dir):
    from kvbm_shm.control.devices import MAX_DEVICES_PER_LEASE

    kv = engine.make_kv(None)
    ns = engine.namespace(kv)
    standin = StandInKv.create(instance, [tuple(t.shape) for t in kv])
    try:
        with engine.connect(instance, runtime_dir) as client:
            pool = client.register_layout(ns)
            handles, exports = export_tensors(standin.tensors)
            register = p.RegisterDevice(req=0, lease=client.lease, pool_id=pool.pool_id, tensors=handles)
            for _ in range(MAX_DEVICES_PER_LEASE):
                client.request(register)
            with pytest.raises(CapacityError) as e:
                client.request(register)
            assert e.value.code == ErrorCode.CAPACITY
            exports.release()
    finally:
        standin.close()


def test_bound_options_are_checked():
    for name in ("max_leases", "max_leases_per_process", "max_pools"):
        with pytest.raises(ConfigError, match=name):
            ServiceConfig(**{name: 0})
    assert (ServiceConfig().max_leases, ServiceConfig().max_leases_per_process, ServiceConfig().max_pools) == (
        4096, 64, 64)


# ---------------------------------------------------------------- case 14: timed-out pinned lookups



def test_pinned_lookup_of_a_stalled_coordinator_is_cancelled(coordinator_factory, instance, runtime_dir):
    coordinator = coordinator_factory(lease_ms=5000)
    kv = engine.make_kv(8)
    hashes = engine.prompt_hashes(3)
    with engine.connect(instance, runtime_dir, "slow", timeout_s=0.3) as client:
        pool = client.register_layout(engine.namespace(kv))
        client.store(pool.bind(kv), hashes, [0, 1, 2])

        def stalled(call):
            os.kill(coordinator.proc.pid, signal.SIGSTOP)
            try:
                with pytest.raises(KvbmError) as e:
                    call()
                return e.value.code
            finally:
                os.kill(coordinator.proc.pid, signal.SIGCONT)

        # a raw pinned lookup is not cancelled: its pins stay until the lease ends or a Cancel comes
        lookup = p.Lookup(req=0, lease=client.lease, pool_id=pool.pool_id, hashes=hashes, pin=True)
        assert stalled(lambda: client.request(lookup)) == ErrorCode.TIMEOUT
        assert wait_for(lambda: client.stats().pools[0].pinned == 3, what="raw lookup pinned")
        assert client.request(p.Cancel(req=0, lease=client.lease, target=lookup.req)).count == 3
        assert client.stats().pools[0].pinned == 0
        # a load of cached blocks asks nothing (the pool's hash index answers): a stall does not stop it
        os.kill(coordinator.proc.pid, signal.SIGSTOP)
        try:
            result, loaded, _ = load_into_zeros(client, pool, hashes)
        finally:
            os.kill(coordinator.proc.pid, signal.SIGCONT)
        assert result.loaded == 3 and loaded == [engine.block_bytes(kv, i) for i in range(3)]
        stats = client.stats()
        assert stats.pools[0].pinned == 0
        assert [c.pins for c in stats.clients if c.name == "slow"] == [0]
        assert "gave up on request" in coordinator.log()

        async def async_load_stalled() -> tuple[ErrorCode, int]:
            async_client = await AsyncClient.connect(instance=instance, runtime_dir=runtime_dir, name="async",
                                                     timeout_s=0.3)
            try:
                async_pool = await async_client.register_layout(pool.namespace)
                os.kill(coordinator.proc.pid, signal.SIGSTOP)
                try:
                    with pytest.raises(KvbmError) as e:  # a pinned lookup needs the coordinator
                        await async_client.lookup(async_pool, hashes, pin=True)
                    result = await async_client.load(async_pool.bind(engine.make_kv(None)), hashes, [0, 1, 2])
                finally:
                    os.kill(coordinator.proc.pid, signal.SIGCONT)
                await asyncio.sleep(0.2)
                return e.value.code, result.loaded, (await async_client.stats()).pools[0].pinned  # its lease still open
            finally:
                await async_client.close()

        assert asyncio.run(async_load_stalled()) == (ErrorCode.TIMEOUT, 3, 0)  # the async client cancels too


def test_pinned_lookup_waiting_for_disk_is_cancelled(instance, runtime_dir):
    disk_dir = Path(runtime_dir) / "disk"
    disk_dir.mkdir()

    def start() -> CoordinatorProcess:
        return CoordinatorProcess(instance, runtime_dir, "--disk-cache-gb", DISK_GB, "--disk-dir", str(disk_dir),
                                  lease_ms=5000, env={"KVBM_DISK_WRITE_THROUGH": "1"}).start()

    coordinator = start()
    eng = None
    try:
        eng = Engine(instance, runtime_dir, pool_blocks=8)
        eng.store(0, 4)
        eng.wait_disk(lambda d: d.counters.get("written_blocks", 0) == 4)
        eng.close()
        coordinator.stop()  # G2 is gone, G3 stays: the next lookup stages from disk
        coordinator = start()
        eng = Engine(instance, runtime_dir, pool_blocks=8)
        with Client(instance=instance, runtime_dir=runtime_dir, name="impatient", timeout_s=0.3) as impatient:
            pool = impatient.register_layout(eng.namespace)
            workers = worker_pids(coordinator)
            for pid in workers:
                os.kill(pid, signal.SIGSTOP)
            try:
                with pytest.raises(KvbmError) as e:  # loads pin nothing; a caller that pins says so
                    impatient.lookup(pool, HASHES[:4], pin=True)
                assert e.value.code == ErrorCode.TIMEOUT
            finally:
                for pid in workers:
                    os.kill(pid, signal.SIGCONT)
            wait_for(lambda: "cancelled lookup" in coordinator.log(), what="the deferred lookup completing")
            stats = eng.client.stats()
            assert stats.pools[0].pinned == 0
            assert {c.name: c.pins for c in stats.clients} == {"engine": 0, "impatient": 0}
        result, same = eng.load(0, 4)  # staged meanwhile: served from G2 now
        assert result.loaded == 4 and same
    finally:
        if eng is not None:
            eng.close()
        coordinator.stop()
        coordinator.remove_leftovers()


def test_service_link_stays_up_through_a_timeout(coordinator_factory, instance, runtime_dir):
    coordinator = coordinator_factory(lease_ms=5000)
    config = ClientConfig(instance=instance, runtime_dir=runtime_dir, timeout_s=0.3)
    link = ServiceLink(config, "slow-service", lambda client: None, retry_s=0.05, max_retry_s=0.2)
    try:
        assert link.up
        os.kill(coordinator.proc.pid, signal.SIGSTOP)
        try:
            assert link.call(lambda client, state: client.stats()) is None  # one slow call
        finally:
            os.kill(coordinator.proc.pid, signal.SIGCONT)
        assert link.up
        assert isinstance(link.call(lambda client, state: client.stats()), p.StatsReply)
    finally:
        link.close()
