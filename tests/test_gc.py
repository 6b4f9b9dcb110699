"""`kvbm-shm gc` removes what dead instances left (a SIGKILLed coordinator's pool and runtime
files, a planted corrupt segment) and leaves a live instance, and a locked one, alone."""

from __future__ import annotations

import json
import os

from kvbm_shm import runtime
from kvbm_shm.cli.main import main
from kvbm_shm.client import Client
from kvbm_shm.observe.probe import StatsProbe, find_endpoint
from kvbm_shm.shm import Segment, list_segments, unlink

from .kv_contents import Contents
from .procs import CoordinatorProcess


def gc_json(capsys, *argv: str) -> dict:
    assert main(["gc", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_gc_removes_orphans_and_leaves_a_live_instance_alone(coordinator_factory, instance, runtime_dir, capsys):
    dead = coordinator_factory()
    with Client(instance=instance, runtime_dir=runtime_dir, name="w") as client:
        Contents.fill(client, stored=2)
    dead.kill()
    live_instance, planted_instance = f"{instance}live", f"{instance}x"
    live = CoordinatorProcess(live_instance, runtime_dir).start()
    planted = f"kvbm-{planted_instance}-pool-0"
    try:
        with Client(instance=live_instance, runtime_dir=runtime_dir, name="w") as client:
            Contents.fill(client, stored=2)
        Segment.create(planted, 4096).close()  # zeros: a pool-named segment with no valid header
        (live_segment,) = live.segments()
        dead_dir = runtime_dir / instance
        expected = {f"/dev/shm/kvbm-{instance}-pool-0", f"/dev/shm/{planted}", str(dead_dir),
                    *(str(dead_dir / f) for f in ("control.sock", "events.sock", "workers-transfer.sock", "runtime.json",
                                                      "coordinator.lock"))}
        argv = [instance, live_instance, planted_instance, "--runtime-dir", str(runtime_dir)]

        plan = gc_json(capsys, *argv, "--dry-run")
        assert {r["path"] for r in plan["removed"]} == expected
        reason = f"instance is live (coordinator pid {live.proc.pid})"
        assert {(k["path"], k["reason"]) for k in plan["kept"]} == {
            (f"/dev/shm/{live_segment}", reason), (str(runtime_dir / live_instance), reason)}
        assert os.path.exists(f"/dev/shm/{planted}") and dead.segments() and dead_dir.exists()

        done = gc_json(capsys, *argv)
        assert {r["path"] for r in done["removed"]} == expected
        assert {k["path"] for k in done["kept"]} == {f"/dev/shm/{live_segment}", str(runtime_dir / live_instance)}
        assert not dead.segments() and not os.path.exists(f"/dev/shm/{planted}") and not dead_dir.exists()
        assert not (runtime_dir / planted_instance).exists()  # the lock gc took for it is gone too
        assert live.segments() == [live_segment]
        with StatsProbe(find_endpoint(live.instance_dir)) as probe:
            assert probe.stats().pools[0].registered == 2

        assert gc_json(capsys, *argv)["removed"] == []
    finally:
        unlink(planted)
        live.stop()
        assert not list_segments(f"kvbm-{live_instance}-")


def test_gc_leaves_a_locked_instance_alone(instance, runtime_dir, capsys):
    """A held instance lock means a coordinator is starting or running: nothing of it is removed."""
    orphan = f"kvbm-{instance}-pool-0"
    Segment.create(orphan, 4096).close()
    instance_dir = runtime.prepare_dir(runtime_dir / instance)
    lock_fd = runtime.claim(instance_dir)
    try:
        report = gc_json(capsys, instance, "--runtime-dir", str(runtime_dir))
        assert report["removed"] == []
        assert {k["path"] for k in report["kept"]} == {f"/dev/shm/{orphan}", str(instance_dir)}
        assert os.path.exists(f"/dev/shm/{orphan}")
    finally:
        os.close(lock_fd)
        unlink(orphan)
