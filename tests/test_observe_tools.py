"""The operator tools against real coordinators with known contents: `ls`, `inspect`, `top` and
`events` print exactly what the pools hold, also when the coordinator is hung or was SIGKILLed,
and a corrupted segment gives a clear error instead of a traceback."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kvbm_shm.cli.main import main
from kvbm_shm.client import Client
from kvbm_shm.observe import live
from kvbm_shm.observe.probe import StatsProbe, find_endpoint
from kvbm_shm.shm import PoolSegment, Segment, unlink

from .kv_contents import BLOCK_BYTES, PAGE, Contents
from .procs import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_json(capsys, *argv: str) -> tuple[int, object]:
    rc = main(list(argv) + ["--json"])
    return rc, json.loads(capsys.readouterr().out)


def run_cli(*argv: str, timeout_s: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvbm_shm", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)


@pytest.fixture
def filled(coordinator, instance, runtime_dir):
    """writer: 8 blocks stored, lookups of 4 and 12 blocks, block 8 left Partial;
    reader: the first 3 blocks pinned."""
    writer = Client(instance=instance, runtime_dir=runtime_dir, name="writer", timeout_s=5)
    reader = Client(instance=instance, runtime_dir=runtime_dir, name="reader", timeout_s=5)
    try:
        contents = Contents.fill(writer)
        writer.lookup(contents.pool, contents.hashes[:4])  # answered from the hash index, reported within 50 ms
        writer.lookup(contents.pool, contents.hashes)
        wait_for(lambda: writer.stats().pools[0].counters["lookups"] == 2, what="the writer's usage report")
        reader_pool = reader.register_layout(contents.pool.namespace, contents.pool.cache_bytes)
        assert len(reader.lookup(reader_pool, contents.hashes[:3], pin=True)) == 3
        contents.allocate_partial(8)
        yield coordinator, contents, writer, reader
    finally:
        reader.close()
        writer.close()


def test_inspect_ls_top_report_the_known_contents(filled, instance, runtime_dir, capsys):
    coordinator, contents, writer, reader = filled
    rd = ["--runtime-dir", str(runtime_dir)]
    hx = [h.hex() for h in contents.hashes]

    rc, report = cli_json(capsys, "inspect", instance, *rd)
    assert rc == 0
    assert report["coordinator"]["state"] == "running" and report["coordinator"]["pid"] == coordinator.proc.pid
    (pool,) = report["pools"]
    num_blocks = contents.pool.num_blocks
    assert pool["geometry"]["num_blocks"] == num_blocks
    assert (pool["geometry"]["block_bytes"], pool["geometry"]["page_size"]) == (BLOCK_BYTES, PAGE)
    assert pool["blocks"] == {"free": num_blocks - 9, "partial": 1, "complete": 0, "registered": 8, "pinned": 3,
                              "inactive": 5, "torn": 0, "invalid": 0}
    assert pool["registered_by_tier"] == {"g2": 8}
    assert pool["pinned_by_client"] == [
        {"client_id": reader.client_id, "blocks": 3, "refs": 3, "name": "reader", "pid": os.getpid()}]
    c = pool["counters"]
    assert (c["lookups"], c["lookup_blocks"], c["hit_blocks"], c["stored_blocks"]) == (3, 4 + 12 + 3, 4 + 8 + 3, 8)
    assert pool["hit_rate"] == pytest.approx(15 / 19)
    top = pool["top_prefixes"]
    assert {r["hash"] for r in top[:3]} == set(hx[:3]) and {r["hits"] for r in top[:3]} == {3}
    assert (top[3]["hash"], top[3]["hits"]) == (hx[3], 2)
    assert sorted((x["name"], x["pins"], x["pending"]) for x in report["clients"]) == [
        ("reader", 3, 0), ("writer", 0, 1)]

    rc, report = cli_json(capsys, "inspect", instance, *rd, "--blocks")
    records = report["pools"][0]["records"]
    assert sorted(r["hash"] for r in records) == sorted(hx[:9])
    assert [r["state"] for r in records if r["hash"] == hx[8]] == ["partial"]

    rc, report = cli_json(capsys, "inspect", instance, *rd, "--hash", hx[5][:10].upper())
    (record,) = report["pools"][0]["records"]
    assert (record["hash"], record["state"], record["checksum_ok"], record["hits"]) == (hx[5], "registered", True, 1)

    rc, view = cli_json(capsys, "ls", *rd)
    assert rc == 0
    (seg,) = [s for s in view["segments"] if s["instance"] == instance]
    assert (seg["kind"], seg["pool_id"], seg["model"], seg["num_blocks"]) == ("pool", 0, "obs-test", num_blocks)
    assert (seg["owner_pid"], seg["owner_alive"], seg["orphan"]) == (coordinator.proc.pid, True, False)
    assert seg["mapped_by"] == sorted([coordinator.proc.pid, os.getpid()])
    assert seg["size_bytes"] == os.stat(f"/dev/shm/{seg['name']}").st_size
    (inst,) = [i for i in view["instances"] if i["instance"] == instance]
    assert (inst["alive"], inst["pid"], inst["segments"]) == (True, coordinator.proc.pid, 1)

    rc = main(["top", instance, *rd, "--json", "--iterations", "2", "--interval", "0.2"])
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert rc == 0 and first["requests_per_s"] is None
    (g2,) = second["tiers"]
    assert (g2["tier"], g2["blocks"], g2["used_blocks"], g2["pinned_blocks"]) == ("g2", num_blocks, 9, 3)
    assert g2["used_bytes"] == 9 * BLOCK_BYTES
    assert second["lookups_per_s"] == 0 and second["hit_rate"] is None
    assert second["hit_rate_total"] == pytest.approx(15 / 19)
    assert sorted(x["name"] for x in second["clients"]) == ["reader", "writer"]  # top itself holds no lease


def test_top_rates_follow_activity(coordinator, instance, runtime_dir):
    with Client(instance=instance, runtime_dir=runtime_dir, name="w") as client, \
            StatsProbe(find_endpoint(coordinator.instance_dir)) as probe:
        contents = Contents.fill(client, stored=4)
        before, t0 = probe.stats(), time.monotonic()
        for _ in range(5):
            client.lookup(contents.pool, contents.hashes[:6])  # 4 of 6 blocks hit
        contents.client.store(contents.kv, contents.hashes[4:6], [4, 5])
        after = probe.stats()
        view = live.summarize(after, before, interval_s=2.0)
    assert time.monotonic() - t0 < 2.0  # the rates below are per 2 s
    assert view.lookups_per_s == 5 / 2
    assert view.hit_rate == 20 / 30
    assert view.hit_bytes_per_s == 20 * BLOCK_BYTES / 2
    assert view.store_bytes_per_s == 2 * BLOCK_BYTES / 2
    assert view.requests_per_s >= (1 + 2) / 2  # the lookups' usage report (sent before the store), allocate, commit


def test_inspect_hung_then_dead_coordinator(coordinator, instance, runtime_dir, capsys):
    client = Client(instance=instance, runtime_dir=runtime_dir, name="w", timeout_s=0.5)
    try:
        contents = Contents.fill(client)
        client.lookup(contents.pool, contents.hashes[:2], pin=True)
        contents.allocate_partial(9)
        expected = {"free": contents.pool.num_blocks - 9, "partial": 1, "complete": 0, "registered": 8,
                    "pinned": 2, "inactive": 6, "torn": 0, "invalid": 0}
        rd = ["--runtime-dir", str(runtime_dir)]
        pid = coordinator.proc.pid

        os.kill(pid, signal.SIGSTOP)
        try:
            rc, report = cli_json(capsys, "inspect", instance, *rd, "--timeout-s", "0.3")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert rc == 0 and report["coordinator"]["state"] == "not answering"
        assert "within 0.3 s" in report["coordinator"]["note"]
        assert report["pools"][0]["blocks"] == expected and report["clients"] is None

        coordinator.kill()
        rc, report = cli_json(capsys, "inspect", instance, *rd)
        assert rc == 0
        assert report["coordinator"]["state"] == "dead" and report["coordinator"]["pid"] == pid
        assert "post-mortem" in report["coordinator"]["note"]
        (pool,) = report["pools"]
        assert pool["blocks"] == expected and pool["coordinator_pid"] == pid
        assert pool["pinned_by_client"] == [
            {"client_id": client.client_id, "blocks": 2, "refs": 2, "name": None, "pid": None}]
        assert pool["counters"]["stored_blocks"] == 8

        rc, view = cli_json(capsys, "ls", *rd)
        (seg,) = [s for s in view["segments"] if s["instance"] == instance]
        assert (seg["owner_alive"], seg["orphan"]) == (False, True)
    finally:
        client.close()
        coordinator.remove_leftovers()


def test_corrupt_segments_give_clear_errors(instance, capsys):
    names = [f"kvbm-{instance}-pool-{i}" for i in range(4)]
    garbage = Segment.create(names[0], 8192)
    garbage.view(np.uint8)[:] = np.random.default_rng(1).integers(0, 256, 8192, dtype=np.uint8)
    garbage.close()
    Segment.create(names[1], 100).close()
    pool = PoolSegment.create(names[2], pool_id=2, num_blocks=2, block_bytes=4096, instance=instance,
                              segment_id="s", fingerprint="f" * 32, namespace=b"")
    pool.header["num_blocks"] = 10**9
    pool.close()
    Segment.create(names[3], 8192).close()  # as left by a creator killed before it wrote the header
    try:
        done = run_cli("inspect", instance)
        assert done.returncode == 2
        assert "Traceback" not in done.stderr + done.stdout
        assert f"kvbm-shm inspect: segment {names[0]} is not a kvbm pool (bad magic)" in done.stderr
        assert "too small for a kvbm pool header" in done.stderr
        assert f"segment {names[2]} has an inconsistent header" in done.stderr
        assert f"segment {names[3]}: header not written yet" in done.stderr

        rc, view = cli_json(capsys, "ls")
        mine = {s["name"]: s for s in view["segments"] if s["name"] in names}
        assert [mine[n]["kind"] for n in names] == ["corrupt"] * 4
        assert all(mine[n]["instance"] == instance and mine[n]["orphan"] for n in names)
    finally:
        for name in names:
            unlink(name)


def test_tools_do_not_import_torch(coordinator, instance, runtime_dir):
    code = ("import sys; from kvbm_shm.cli.main import main\n"
            f"for argv in (['ls'], ['inspect', '{instance}'], ['gc', '--dry-run', '{instance}'],"
            f" ['top', '{instance}', '--iterations', '1']):\n"
            f"    assert main(argv + ['--json', '--runtime-dir', '{runtime_dir}']) == 0, argv\n"
            "assert 'torch' not in sys.modules, 'a read-only tool imported torch'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def _read_until(fd: int, needle: bytes, timeout_s: float) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout_s
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not seen in output: {seen[-500:]!r}"
        if select.select([fd], [], [], left)[0]:
            seen += os.read(fd, 65536)
    return seen


@pytest.mark.parametrize("how", ["q", "ctrl-c"])
def test_top_full_screen_exits_cleanly(coordinator, instance, runtime_dir, how):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "kvbm_shm", "top", instance, "--runtime-dir", str(runtime_dir),
                             "--interval", "0.2"], cwd=REPO, stdin=slave, stdout=slave, stderr=slave,
                            env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"},
                            start_new_session=True)
    os.close(slave)
    try:
        _read_until(master, b"q quits", 15)
        if how == "q":
            os.write(master, b"q")
        else:
            os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)


def test_events_prints_the_stream(coordinator, instance, runtime_dir):
    proc = subprocess.Popen([sys.executable, "-m", "kvbm_shm", "events", instance, "--runtime-dir", str(runtime_dir),
                             "--json", "--count", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert "listening to ipc://" in proc.stderr.readline()
        with Client(instance=instance, runtime_dir=runtime_dir, name="w") as client:
            # room for every chain stored before the deadline: an eviction would publish a "removed" batch
            contents = Contents.fill(client, num_blocks=1024, stored=1)
            stored = {contents.hashes[0].hex()}
            chain = 0
            deadline = time.monotonic() + 15
            while proc.poll() is None and time.monotonic() < deadline:  # until the subscription is up
                chain += 1
                hashes = Contents.chain(chain, 2)
                client.store(contents.kv, hashes, [0, 1])
                stored |= {h.hex() for h in hashes}
                time.sleep(0.05)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err
    batches = [json.loads(line) for line in out.splitlines()]
    assert len(batches) == 2
    assert batches[1]["seq"] == batches[0]["seq"] + 1
    assert batches[0]["instance_id"] == batches[1]["instance_id"]
    for batch in batches:
        (event,) = batch["events"]
        assert (event["type"], event["tier"], event["pool_id"]) == ("stored", 2, 0)
        assert event["hashes"] and set(event["hashes"]) <= stored
