"""Issue 9, the cases about files, directories and values another user or a bad input controls:
foreign segments (2), the runtime directory and a fake coordinator (3), instance names and
socket path lengths (9), configuration values and the tools run by another user (13).

Real coordinator processes; the attacker is a real unprivileged user created for the test
(`other_user`). Every case asserts the exact outcome: the error code and message, the bytes an
engine gets back, which files exist afterwards and whose they are.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from kvbm_shm import runtime
from kvbm_shm.cli.main import main
from kvbm_shm.client import Client
from kvbm_shm.config import ClientConfig, ServiceConfig
from kvbm_shm.errors import ConfigError, ErrorCode, ForeignError
from kvbm_shm.kernels.cpu_copy import checksum
from kvbm_shm.observe import gc as _gc, node as _node  # noqa: F401  (imported before forking: see conftest)
from kvbm_shm.ownership import user_name
from kvbm_shm.shm import HEADER_DTYPE, RECORD_DTYPE, SHM_DIR, BlockState, Segment, pool_name, unlink

from .. import engine
from ..procs import start_child

REPO = Path(__file__).resolve().parents[2]
ME = f"uid {os.getuid()} ({user_name(os.getuid())})"
NUM_BLOCKS = 4


def serve_cli(*argv: str, env: dict | None = None, timeout_s: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvbm_shm", "serve", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s, env={**os.environ, **(env or {})})


def assert_refused(done: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 2, the message on stderr as one `kvbm-shm serve:` line, no traceback."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("kvbm-shm serve: "), done.stderr
    assert message in done.stderr, (message, done.stderr)


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """`kvbm-shm ARGV` in this process: (exit status, stdout, stderr); an exception escapes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def poison(image: bytes, pattern: int) -> bytes:
    """A pool image whose registered blocks hold `pattern` bytes, with checksums that match them:
    what an attacker who read our pool would plant."""
    buf = bytearray(image)
    h = np.frombuffer(buf, HEADER_DTYPE, 1)[0]
    table = np.frombuffer(buf, RECORD_DTYPE, int(h["num_blocks"]), int(h["table_offset"]))
    for b in np.flatnonzero(table["state"] == BlockState.REGISTERED):
        start = int(h["data_offset"]) + int(b) * int(h["block_stride"])
        buf[start:start + int(h["block_bytes"])] = bytes([pattern]) * int(h["block_bytes"])
        table["checksum"][b] = checksum(bytes(buf[start:start + int(h["block_bytes"])]))
    del h, table
    return bytes(buf)


def plant(path: str, data: bytes, mode: int = 0o600) -> None:
    """(as the other user) create `path` with `data`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def owner_of(path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, stat.S_IMODE(st.st_mode)


# ---------------------------------------------------------------- case 2: foreign segments


def test_a_planted_pool_is_left_alone_and_never_served(other_user, coordinator_factory, instance, runtime_dir):
    kv = engine.make_kv(7)
    hashes = engine.prompt_hashes(NUM_BLOCKS)
    ids = list(range(NUM_BLOCKS))
    first = coordinator_factory()
    with engine.connect(instance, runtime_dir) as client:
        pool = client.register_layout(engine.namespace(kv))
        assert client.store(pool.bind(kv), hashes, ids).stored == NUM_BLOCKS
        name = pool.segment.name
        image = (SHM_DIR / name).read_bytes()
    first.stop()
    assert name == pool_name(instance, 0) and not (SHM_DIR / name).exists()
    planted = poison(image, 0x5A)
    path = str(SHM_DIR / name)
    other_user.call(plant, path, planted)
    try:
        assert owner_of(path) == (other_user.uid, 0o600)
        second = coordinator_factory()
        assert len(re.findall(r"leaving a segment that is not ours alone: .*" + re.escape(path), second.log())) == 1
        assert f"owned by uid {other_user.uid} ({other_user.name})" in second.log()

        rc, out, err = run_main(["ls", "--runtime-dir", str(runtime_dir), "--json"])
        assert rc == 0 and err == ""
        (seg,) = [s for s in json.loads(out)["segments"] if s["name"] == name]
        assert (seg["kind"], seg["uid"], seg["user"], seg["orphan"]) == ("foreign", other_user.uid,
                                                                        other_user.name, None)
        rc, out, _ = run_main(["ls", "--runtime-dir", str(runtime_dir)])
        (row,) = [line for line in out.splitlines() if line.startswith(name + " ")]
        assert f"FOREIGN ({other_user.name}, uid {other_user.uid})" in row

        zeros = engine.make_kv(None)
        with engine.connect(instance, runtime_dir) as client:
            pool = client.register_layout(engine.namespace(kv))
            assert pool.segment.name == pool_name(instance, 1)  # named past the planted file
            assert client.lookup(pool, hashes) == []  # nothing of the planted pool is matchable
            assert client.store(pool.bind(kv), hashes, ids).stored == NUM_BLOCKS
            loaded = client.load(pool.bind(zeros), hashes, ids)
            assert (loaded.loaded, loaded.failed) == (NUM_BLOCKS, [])
        assert [engine.block_bytes(zeros, b) for b in ids] == [engine.block_bytes(kv, b) for b in ids]
        second.stop()
        rc, out, _ = run_main(["gc", "--runtime-dir", str(runtime_dir), "--json"])
        report = json.loads(out)
        assert rc == 0 and [r["path"] for r in report["removed"] if r["path"] == path] == []
        (kept,) = [k for k in report["kept"] if k["path"] == path]
        assert kept["reason"].startswith("not ours: ") and other_user.name in kept["reason"]
        assert owner_of(path) == (other_user.uid, 0o600) and Path(path).read_bytes() == planted
    finally:
        os.unlink(path)


def test_a_foreign_file_at_the_next_pool_name_does_not_block_pools(other_user, coordinator, instance,
                                                                   runtime_dir):
    kv = engine.make_kv(3)
    hashes = engine.prompt_hashes(2)
    squatted = [str(SHM_DIR / pool_name(instance, 0))]
    other_user.call(plant, squatted[0], b"\0" * 4096)  # after the coordinator started: not seen by recover
    try:
        with engine.connect(instance, runtime_dir) as client:
            pool = client.register_layout(engine.namespace(kv), cache_bytes=8 << 20)  # room for another
            assert pool.segment.name == pool_name(instance, 1)
            assert client.store(pool.bind(kv), hashes, [0, 1]).stored == 2
            zeros = engine.make_kv(None)
            assert client.load(pool.bind(zeros), hashes, [0, 1]).loaded == 2
            assert engine.block_bytes(zeros, 1) == engine.block_bytes(kv, 1)
            # every name the coordinator would try next (2 .. 65) is taken: a typed error naming the
            # first one and its owner, and the coordinator keeps serving
            squatted += [str(SHM_DIR / pool_name(instance, i)) for i in range(2, 66)]
            for path in squatted[1:]:
                other_user.call(plant, path, b"")
            with pytest.raises(ForeignError) as refused:
                client.register_layout(engine.namespace(kv, "another-model"))
            assert refused.value.code == ErrorCode.FOREIGN
            assert str(refused.value) == (
                f"cannot name a new pool of instance {instance!r}: {squatted[1]} is a regular file owned by uid "
                f"{other_user.uid} ({other_user.name}), mode 0600, and the next 63 names are taken too by files "
                "that were not adopted; remove them")
            assert len(client.lookup(pool, hashes)) == 2
        assert coordinator.proc.poll() is None
    finally:
        for path in squatted:
            os.unlink(path)


def test_segments_that_are_not_ours_are_refused(other_user, instance, tmp_path):
    ours = Segment.create(f"kvbm-{instance}-own", 4096)
    names = {kind: f"kvbm-{instance}-{kind}" for kind in ("other", "link", "fifo", "loose")}
    try:
        other_user.call(plant, str(SHM_DIR / names["other"]), b"\0" * 4096)
        os.symlink(SHM_DIR / ours.name, SHM_DIR / names["link"])
        os.mkfifo(SHM_DIR / names["fifo"], 0o600)
        plant(str(SHM_DIR / names["loose"]), b"\0" * 4096, 0o644)
        os.chmod(SHM_DIR / names["loose"], 0o644)
        expected = {"other": f"a regular file owned by uid {other_user.uid} ({other_user.name}), mode 0600",
                    "link": f"a symbolic link owned by {ME}, mode 0777", "fifo": f"a FIFO owned by {ME}, mode 0600",
                    "loose": f"a regular file owned by {ME}, mode 0644"}
        for kind, name in names.items():
            for writable in (True, False):
                with pytest.raises(ForeignError) as refused:
                    Segment.attach(name, writable=writable)
                assert refused.value.code == ErrorCode.FOREIGN
                assert f"{SHM_DIR / name} is not ours to use: it is {expected[kind]}" in str(refused.value)
            with pytest.raises(ForeignError):
                unlink(name)
            assert os.path.lexists(SHM_DIR / name)
        with pytest.raises(ForeignError) as taken:
            Segment.create(names["other"], 4096)
        assert f"the name is taken by a regular file owned by uid {other_user.uid}" in str(taken.value)
        old_umask = os.umask(0o777)  # the creator's umask cannot make a segment unusable or open
        try:
            made = Segment.create(f"kvbm-{instance}-umask", 4096)
        finally:
            os.umask(old_umask)
        assert owner_of(SHM_DIR / made.name) == (os.getuid(), 0o600)
        Segment.attach(made.name).close()
        made.close()
        assert unlink(made.name)
    finally:
        ours.close()
        unlink(ours.name)
        for name in names.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SHM_DIR / name)
