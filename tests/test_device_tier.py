"""The device tier on CPU: engines' "device" KV in stand-in shm segments, moved by transfer workers.

Stories, against exact bytes and exact block state:
- engine A offloads through the transfer worker; engine B (another process) onboards the same
  hashes into other device blocks of its own tensors: the bytes are A's.
- engine-driven (the engine copies) and worker-driven (a worker copies) write the same G2 bytes
  and checksums, and each can load what the other stored.
- a worker killed with SIGKILL in the middle of an offload: no block is left Registered, every
  position is reported failed, the blocks are free again, and a restarted worker does the job.
- an engine that dies leaves no stand-in segment behind; an unregistered device takes no jobs.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kvbm_shm import protocol as p
from kvbm_shm.client import Client
from kvbm_shm.device.client import DeviceKv
from kvbm_shm.errors import DeviceError, RequestError
from kvbm_shm.kernels import cpu_copy
from kvbm_shm.layout import EngineLayout, KvLayout, Namespace, TensorSpec
from kvbm_shm.shm import BlockState, list_segments
from kvbm_shm.device.standin import StandInKv, segment_prefix

from .procs import run_child, start_child

L, H, P, D = 2, 2, 16, 32  # layers, kv heads, tokens per block, head dim: 16 KiB blocks
NB = 24  # device blocks per engine


def namespace(layers=L, heads=H, page=P, head_dim=D) -> Namespace:
    spec = TensorSpec((heads, page, 2 * head_dim), 0, "float32")  # vLLM CPU layout, one tensor per layer
    return Namespace("device-tier-test", KvLayout(layers, 2, page, heads * head_dim, "float32"),
                     EngineLayout((spec,) * layers))


def shapes(ns: Namespace, num_blocks: int) -> list[tuple[int, ...]]:
    return [(num_blocks, *t.block_shape) for t in ns.engine_layout.tensors]


def hashes(seed: int, n: int) -> list[bytes]:
    return [(seed * 1_000_003 + i).to_bytes(16, "little") for i in range(n)]


def fill(tensors, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in tensors:
        t.copy_(torch.randn(t.shape, generator=g))


def connect(instance: str, runtime_dir) -> Client:
    return Client(instance=instance, runtime_dir=Path(runtime_dir), name=f"engine-{os.getpid()}", timeout_s=20)


# ---------------------------------------------------------------- child engines


def engine_offload(instance: str, runtime_dir: str, seed: int, device_ids: list[int]) -> dict:
    """Engine A: fill its KV, offload `device_ids` through the worker; returns what it stored."""
    ns = namespace()
    with connect(instance, runtime_dir) as client:
        pool = client.register_layout(ns)
        kv = StandInKv.create(instance, shapes(ns, NB))
        try:
            fill(kv.tensors, seed)
            with DeviceKv.register(client, pool, kv.tensors, mode="worker") as dev:
                t = dev.offload(hashes(seed, len(device_ids)), device_ids)
                result = t.wait(timeout_s=10)
            blocks = [np.concatenate([x[b].numpy().view(np.uint8).ravel() for x in kv.tensors]) for b in device_ids]
            return {"result": result, "checksums": [cpu_copy.checksum(b) for b in blocks]}
        finally:
            kv.close()


def engine_onboard(instance: str, runtime_dir: str, seed: int, n: int, device_ids: list[int]) -> dict:
    """Engine B: onboard A's hashes into its own (zeroed) device blocks; returns their checksums."""
    ns = namespace()
    with connect(instance, runtime_dir) as client:
        pool = client.register_layout(ns)
        kv = StandInKv.create(instance, shapes(ns, NB))
        try:
            with DeviceKv.register(client, pool, kv.tensors, mode="worker") as dev:
                result = dev.onboard(hashes(seed, n), device_ids).wait(timeout_s=10)
            blocks = [np.concatenate([x[b].numpy().view(np.uint8).ravel() for x in kv.tensors]) for b in device_ids]
            untouched = [b for b in range(NB) if b not in device_ids]
            zero = all(float(x[b].abs().sum()) == 0.0 for x in kv.tensors for b in untouched)
            return {"result": result, "checksums": [cpu_copy.checksum(b) for b in blocks], "untouched_zero": zero}
        finally:
            kv.close()


def engine_dies_holding_standin(instance: str, runtime_dir: str) -> None:
    ns = namespace()
    client = connect(instance, runtime_dir)
    pool = client.register_layout(ns)
    kv = StandInKv.create(instance, shapes(ns, NB))
    DeviceKv.register(client, pool, kv.tensors, mode="worker")
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- tests


def test_offload_by_worker_then_onboard_into_another_engine(coordinator, runtime_dir):
    src_ids = [17, 3, 9, 4, 22, 0]
    a = run_child(engine_offload, coordinator.instance, str(runtime_dir), 7, src_ids, timeout_s=60)
    assert a["result"].moved == len(src_ids) and a["result"].failed == []
    assert a["result"].nbytes == len(src_ids) * namespace().kv.block_bytes
    dst_ids = [1, 2, 5, 8, 13, 21]
    b = run_child(engine_onboard, coordinator.instance, str(runtime_dir), 7, len(src_ids), dst_ids, timeout_s=60)
    assert b["result"].loaded == len(src_ids) and b["result"].failed == []
    assert b["checksums"] == a["checksums"]  # B's device blocks hold A's bytes
    assert b["untouched_zero"]
    assert not list_segments(segment_prefix(coordinator.instance))  # both engines unlinked theirs


def test_engine_driven_and_worker_driven_agree(coordinator, runtime_dir):
    ns = namespace()
    with connect(coordinator.instance, runtime_dir) as client:
        pool = client.register_layout(ns)
        kv = StandInKv.create(coordinator.instance, shapes(ns, NB))
        out = StandInKv.create(coordinator.instance, shapes(ns, NB))
        try:
            fill(kv.tensors, 11)
            ids = [5, 6, 7, 2]
            engine = DeviceKv.register(client, pool, kv.tensors, mode="engine")
            worker = DeviceKv.register(client, pool, kv.tensors, mode="worker")
            t_engine = engine.offload(hashes(1, 4), ids)
            t_worker = worker.offload(hashes(2, 4), ids)
            assert t_engine.done() and t_engine.result.moved == 4
            assert t_worker.wait(timeout_s=10).moved == 4
            # the same device blocks, stored both ways: the same G2 bytes and the same checksums
            by_engine = client.lookup(pool, hashes(1, 4))
            by_worker = client.lookup(pool, hashes(2, 4))
            for e, w in zip(by_engine, by_worker):
                assert np.array_equal(pool.block(e), pool.block(w))
            table = pool.segment.table
            assert table["checksum"][by_engine].tolist() == table["checksum"][by_worker].tolist()
            # each mode loads what the other stored
            reader_w = DeviceKv.register(client, pool, out.tensors, mode="worker")
            reader_e = DeviceKv.register(client, pool, out.tensors, mode="engine")
            assert reader_w.onboard(hashes(1, 4), [0, 1, 2, 3]).wait(timeout_s=10).loaded == 4
            assert reader_e.onboard(hashes(2, 4), [8, 9, 10, 11]).done()
            for src, dst in zip(kv.tensors, out.tensors):
                assert torch.equal(src[ids], dst[[0, 1, 2, 3]])
                assert torch.equal(src[ids], dst[[8, 9, 10, 11]])
            # a second offload of cached hashes moves nothing and says so
            again = worker.offload(hashes(2, 4), ids)
            assert again.transfer_id == 0 and again.result.present == 4
            worker.unregister()
            reader_w.unregister()
            with pytest.raises(RequestError, match="no device"):
                client.request(p.Offload(req=0, lease=client.lease, device_id=worker.device_id, hashes=hashes(3, 1),
                                         device_block_ids=[0]))
        finally:
            kv.close()
            out.close()


def test_worker_killed_mid_offload_leaves_no_registered_partial_block(coordinator_factory, runtime_dir):
    coordinator = coordinator_factory(cpu_cache_gb=0.25, lease_ms=5000)  # big segments: slow first touch
    ns = namespace(layers=4, heads=4, page=32, head_dim=64)  # 256 KiB blocks
    num_blocks = 384  # 96 MiB, copied block by block in scattered order
    with connect(coordinator.instance, runtime_dir) as client:
        pool = client.register_layout(ns)
        kv = StandInKv.create(coordinator.instance, shapes(ns, num_blocks))
        try:
            fill(kv.tensors, 5)
            dev = DeviceKv.register(client, pool, kv.tensors, mode="worker")
            worker_pid = _wait_for_worker(coordinator.proc.pid)
            device_ids = list(range(num_blocks - 1, -1, -1))  # reversed: no two chunks merge
            for attempt in range(10):
                batch = hashes(100 + attempt, num_blocks)
                t = dev.offload(batch, device_ids)
                g2 = t.block_ids
                first, last = pool.block(g2[0]), pool.block(g2[-1])
                started = time.monotonic() + 10
                while not first[-64:].any():  # until the worker has written the first block
                    assert time.monotonic() < started, "the worker never started the job"
                os.kill(worker_pid, signal.SIGSTOP)
                expect_last = np.concatenate([x[device_ids[-1]].numpy().view(np.uint8).ravel() for x in kv.tensors])
                if not np.array_equal(last, expect_last):
                    break  # stopped mid-job: some blocks written, the last one not
                os.kill(worker_pid, signal.SIGCONT)  # it finished first; try again with new hashes
                assert t.wait(timeout_s=10).moved == num_blocks
            else:
                pytest.skip("the worker always finished before it could be stopped")
            os.kill(worker_pid, signal.SIGKILL)
            result = t.wait(timeout_s=10)
            assert result.moved == 0 and result.failed == list(range(num_blocks))
            assert "died" in result.error
            states = pool.segment.read_records(g2)["state"]
            assert (states == BlockState.RESET).all()  # nothing Registered, nothing left Partial
            assert client.lookup(pool, batch) == []
            # the worker comes back and does the same job
            assert _wait_for_worker(coordinator.proc.pid, not_pid=worker_pid) != worker_pid
            retry = dev.offload(batch, device_ids).wait(timeout_s=20)
            assert retry.moved == num_blocks and retry.failed == []
            dev.unregister()
        finally:
            kv.close()


def test_dead_engine_leaves_no_standin_segment(coordinator, runtime_dir):
    child = start_child(engine_dies_holding_standin, coordinator.instance, str(runtime_dir), timeout_s=30)
    child.process.join(30)
    if child.process.exitcode != -signal.SIGKILL:
        child.result()  # re-raises the child's own failure, with its traceback
    assert child.process.exitcode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while list_segments(segment_prefix(coordinator.instance)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list_segments(segment_prefix(coordinator.instance))


def test_registration_is_checked(coordinator, runtime_dir):
    ns = namespace()
    with connect(coordinator.instance, runtime_dir) as client:
        pool = client.register_layout(ns)
        plain = [torch.zeros(s) for s in shapes(ns, NB)]
        with pytest.raises(DeviceError, match="not in shared memory"):
            DeviceKv.register(client, pool, plain, mode="worker")
        assert DeviceKv.register(client, pool, plain, mode="engine").num_device_blocks == NB
        kv = StandInKv.create(coordinator.instance, [(NB, H, P, D)] * L)  # half the block
        try:
            with pytest.raises(ValueError, match="does not match"):
                DeviceKv.register(client, pool, kv.tensors, mode="worker")
            from kvbm_shm.device.ipc import export_tensors

            handles, _ = export_tensors(kv.tensors)
            with pytest.raises(RequestError, match="engine layout"):
                client.request(p.RegisterDevice(req=0, lease=client.lease, pool_id=pool.pool_id, tensors=handles))
        finally:
            kv.close()


def _wait_for_worker(coordinator_pid: int, not_pid: int = 0, timeout_s: float = 15) -> int:
    """Pid of the coordinator's transfer worker (a different one than `not_pid`), once it runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in _children(coordinator_pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"kvbm_shm.workers.transfer" in cmdline and pid != not_pid:
                return pid
        time.sleep(0.05)
    raise AssertionError("no transfer worker is running")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_wait_times_out_while_a_worker_is_stopped_then_completes(coordinator, runtime_dir):
    ns = namespace()
    with connect(coordinator.instance, runtime_dir) as client:
        pool = client.register_layout(ns)
        kv = StandInKv.create(coordinator.instance, shapes(ns, NB))
        try:
            fill(kv.tensors, 3)
            dev = DeviceKv.register(client, pool, kv.tensors, mode="worker")
            worker_pid = _wait_for_worker(coordinator.proc.pid)
            assert dev.offload(hashes(8, 1), [0]).wait(timeout_s=10).moved == 1  # the worker is ready
            os.kill(worker_pid, signal.SIGSTOP)
            try:
                t = dev.offload(hashes(9, 3), [1, 2, 3])
                assert not t.done()  # a poll answers at once
                t0 = time.monotonic()
                assert t.wait(timeout_s=0.3) is None
                assert 0.25 <= time.monotonic() - t0 < 2.0
                assert client.lookup(pool, hashes(9, 3)) == []  # Partial blocks are not matchable
            finally:
                os.kill(worker_pid, signal.SIGCONT)
            result = t.wait(timeout_s=10)
            assert result.moved == 3 and t.done()
            assert len(client.lookup(pool, hashes(9, 3))) == 3
            with pytest.raises(RequestError, match="already reported"):
                client.request(p.WaitTransfers(req=0, lease=client.lease, transfer_ids=[t.transfer_id], timeout_ms=0))
            dev.unregister()
        finally:
            kv.close()


def _read_fds(name: str, token: bytes) -> list[bytes]:
    from kvbm_shm.device.fd_passing import fetch_fds

    fds = fetch_fds(name, token)
    try:
        return [os.pread(fd, 64, 0) for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)


def test_file_descriptors_pass_between_processes():
    from kvbm_shm.device.fd_passing import FdServer, fetch_fds

    server = FdServer.shared()
    fds = []
    for text in (b"first piece", b"second piece"):
        fd = os.memfd_create("kvbm-test")
        os.write(fd, text)
        fds.append(fd)
    token = server.offer(fds)
    assert run_child(_read_fds, server.name, token, timeout_s=30) == [b"first piece", b"second piece"]
    assert _read_fds(server.name, token) == [b"first piece", b"second piece"]  # offered until withdrawn
    server.withdraw(token)
    with pytest.raises(DeviceError, match="no file descriptors"):
        fetch_fds(server.name, token)
    with pytest.raises(DeviceError, match="cannot fetch"):
        fetch_fds("kvbm-fds-nobody", token)


def test_cuda_paths_import_without_a_gpu():
    import subprocess
    import sys

    code = ("import kvbm_shm, kvbm_shm.device.client, kvbm_shm.workers.transfer, kvbm_shm.kernels.cuda_copy, "
            "kvbm_shm.device.cuda_ipc, kvbm_shm.kernels.host_register\n"
            "from kvbm_shm.kernels import cuda_driver\n"
            "print(cuda_driver.gpu_available())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("True", "False")


def test_onboard_reports_and_drops_a_block_that_fails_its_checksum(coordinator, runtime_dir):
    ns = namespace()
    with connect(coordinator.instance, runtime_dir) as client:
        pool = client.register_layout(ns)
        kv = StandInKv.create(coordinator.instance, shapes(ns, NB))
        try:
            fill(kv.tensors, 4)
            dev = DeviceKv.register(client, pool, kv.tensors, mode="worker")
            assert dev.offload(hashes(4, 4), [0, 1, 2, 3]).wait(timeout_s=10).moved == 4
            g2 = client.lookup(pool, hashes(4, 4))
            pool.block(g2[2])[100] ^= 0xFF  # bit rot in the third block
            for x in kv.tensors:
                x[10:14] = 0
            result = dev.onboard(hashes(4, 4), [10, 11, 12, 13]).wait(timeout_s=10)
            assert result.failed == [2] and result.loaded == 2 and result.moved == 3
            assert client.lookup(pool, hashes(4, 4)) == g2[:2]  # invalidated: never served again
            assert pool.segment.read_records([g2[2]])["state"][0] == BlockState.RESET
            for x in kv.tensors:  # the good blocks arrived; block 12 is the engine's to recompute
                assert torch.equal(x[[0, 1, 3]], x[[10, 11, 13]])
            dev.unregister()
        finally:
            kv.close()
