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
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from kvbm_shm import runtime
from kvbm_shm.cli.main import main
from kvbm_shm.client import Client
from kvbm_shm.config import ClientConfig, ServiceConfig
from kvbm_shm.errors import ConfigError, ErrorCode, ForeignError
from kvbm_shm.kernels.cpu_copy import checksum
from kvbm_shm.ownership import user_name
from kvbm_shm.names import pool_name
from kvbm_shm.shm import HEADER_DTYPE, RECORD_DTYPE, SHM_DIR, BlockState, Segment, unlink

from .. import engine
from ..procs import CoordinatorProcess

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


def test_a_g3_file_that_is_not_ours_is_never_read_nor_removed(other_user, coordinator_factory, instance, runtime_dir,
                                                               tmp_path):
    disk = ("--disk-cache-gb", "0.01", "--disk-dir", str(tmp_path), "--disk-write-through")
    kv, hashes = engine.make_kv(7), engine.prompt_hashes(NUM_BLOCKS)
    first = coordinator_factory(*disk)
    with engine.connect(instance, runtime_dir) as client:
        pool = client.register_layout(engine.namespace(kv))
        assert client.store(pool.bind(kv), hashes, list(range(NUM_BLOCKS))).stored == NUM_BLOCKS
        deadline = time.monotonic() + 20
        while sum(d.stored for d in client.stats().disks) < NUM_BLOCKS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(d.stored for d in client.stats().disks) == NUM_BLOCKS
    first.stop()
    (path,) = (tmp_path / instance).glob("g3-*.blocks")
    image = path.read_bytes()
    os.chown(path, other_user.uid, other_user.gid)  # as if another user had left it there: valid, but not ours
    second = coordinator_factory(*disk)
    assert f"leaving {path} alone: " in second.log() and f"owned by uid {other_user.uid}" in second.log()
    with engine.connect(instance, runtime_dir) as client:
        pool = client.register_layout(engine.namespace(kv))
        assert client.lookup(pool, hashes) == []  # nothing comes from the file
        assert client.stats().disks == []  # and no G3 file replaces it
    second.stop()
    assert owner_of(path) == (other_user.uid, 0o600) and path.read_bytes() == image
    path.unlink()


def test_a_disk_directory_that_is_not_ours_is_refused(other_user, instance, runtime_dir, tmp_path):
    theirs = tmp_path / instance
    theirs.mkdir(mode=0o700)
    os.chown(theirs, other_user.uid, other_user.gid)
    done = serve_cli("--instance", instance, "--runtime-dir", str(runtime_dir), "--disk-cache-gb", "0.01",
                     "--disk-dir", str(tmp_path))
    assert_refused(done, f"disk directory {theirs} is not ours to trust: it is a directory owned by uid "
                         f"{other_user.uid} ({other_user.name}), mode 0700")


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


# ---------------------------------------------------------------- case 3: the runtime directory


def _symlinked_root(base: Path, other) -> tuple[Path, str]:
    (base / "real").mkdir(mode=0o700)
    (base / "root").symlink_to(base / "real")
    return base / "root", f"runtime directory {base / 'root'} is not ours to trust: it is a symbolic link owned by {ME}"


def _others_root(base: Path, other) -> tuple[Path, str]:
    (base / "root").mkdir(mode=0o700)
    os.chown(base / "root", other.uid, other.gid)
    return base / "root", (f"runtime directory {base / 'root'} is not ours to trust: it is a directory owned by "
                           f"uid {other.uid} ({other.name}), mode 0700")


def _group_writable_root(base: Path, other) -> tuple[Path, str]:
    (base / "root").mkdir()
    os.chmod(base / "root", 0o770)
    return base / "root", (f"runtime directory {base / 'root'} is not ours to trust: it is a directory owned by "
                           f"{ME}, mode 0770")


def _symlinked_instance_dir(base: Path, other, instance: str) -> tuple[Path, str]:
    (base / "root").mkdir(mode=0o700)
    (base / "elsewhere").mkdir(mode=0o700)
    (base / "root" / instance).symlink_to(base / "elsewhere")
    return base / "root", (f"runtime directory {base / 'root' / instance} is not ours to trust: it is a symbolic "
                           f"link owned by {ME}")


def _others_instance_dir(base: Path, other, instance: str) -> tuple[Path, str]:
    (base / "root" / instance).mkdir(mode=0o700, parents=True)
    os.chown(base / "root" / instance, other.uid, other.gid)
    return base / "root", (f"runtime directory {base / 'root' / instance} is not ours to trust: it is a directory "
                           f"owned by uid {other.uid} ({other.name}), mode 0700")


def _root_under_others_dir(base: Path, other) -> tuple[Path, str]:
    (base / "theirs").mkdir(mode=0o755)
    os.chown(base / "theirs", other.uid, other.gid)
    (base / "theirs" / "root").mkdir(mode=0o700)
    return base / "theirs" / "root", (f"runtime directory {base / 'theirs' / 'root'} lies under {base / 'theirs'}, "
                                      f"a directory owned by uid {other.uid} ({other.name}), mode 0755: another "
                                      "user could replace it")


@pytest.mark.parametrize("make", [_symlinked_root, _others_root, _group_writable_root, _symlinked_instance_dir,
                                  _others_instance_dir, _root_under_others_dir])
def test_an_untrusted_runtime_directory_is_refused(make, other_user, instance, runtime_dir):
    if "instance" in make.__code__.co_varnames:
        root, message = make(runtime_dir, other_user, instance)
    else:
        root, message = make(runtime_dir, other_user)
    before = {p: owner_of(p) for p in runtime_dir.rglob("*")}
    assert_refused(serve_cli("--instance", instance, "--runtime-dir", str(root)), message)
    assert {p: owner_of(p) for p in runtime_dir.rglob("*")} == before  # nothing created, nothing chmod'ed
    with pytest.raises(ForeignError) as refused:
        Client(instance=instance, runtime_dir=root, timeout_s=2)
    assert refused.value.code == ErrorCode.FOREIGN and message in str(refused.value)


def test_a_coordinator_other_than_the_one_the_runtime_file_names_is_refused(coordinator, instance, runtime_dir):
    d = runtime_dir / instance
    info = runtime.read_info(d)
    assert info.pid == coordinator.proc.pid
    assert runtime.trusted_info(d) == info
    runtime.write_info(d, runtime.RuntimeInfo(**{**{f: getattr(info, f) for f in info.__struct_fields__},
                                                 "pid": os.getpid()}))
    with pytest.raises(ForeignError) as refused:
        Client(instance=instance, runtime_dir=runtime_dir, timeout_s=2)
    assert str(refused.value) == (f"the process listening at {d / runtime.CONTROL_SOCKET} is pid {info.pid} of {ME}, "
                                  f"but {d / runtime.INFO_FILE} names pid {os.getpid()} of {ME}: not our coordinator")
    os.replace(d / runtime.INFO_FILE, runtime_dir / "saved.json")
    (d / runtime.INFO_FILE).symlink_to(runtime_dir / "saved.json")
    with pytest.raises(ForeignError) as refused:
        Client(instance=instance, runtime_dir=runtime_dir, timeout_s=2)
    assert f"{d / runtime.INFO_FILE} is not ours to use: it is a symbolic link owned by {ME}" in str(refused.value)
    os.unlink(d / runtime.INFO_FILE)
    runtime.write_info(d, info)
    with Client(instance=instance, runtime_dir=runtime_dir, timeout_s=5) as client:  # the real one: trusted
        assert client.stats().pid == coordinator.proc.pid


def listen_forever(path: str) -> None:
    """(as the other user) a fake coordinator: a unix socket that accepts and never answers. It
    appears at `path` only once it listens (bound under another name, then renamed)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path + ".tmp")
    sock.listen(16)
    os.rename(path + ".tmp", path)
    while True:
        time.sleep(1)


def test_a_fake_coordinator_of_another_user_is_refused(other_user, instance, runtime_dir):
    d = runtime.prepare_dir(runtime_dir / instance)
    stage = Path(tempfile.mkdtemp(prefix="kvfake", dir="/tmp"))  # the other user's own directory
    os.chown(stage, other_user.uid, other_user.gid)
    fake = other_user.spawn(listen_forever, str(stage / "s"))
    try:
        deadline = time.monotonic() + 20
        while not (stage / "s").exists():
            assert time.monotonic() < deadline, "the fake coordinator did not start"
            time.sleep(0.02)
        control = d / runtime.CONTROL_SOCKET
        os.rename(stage / "s", control)  # what a hijacked directory would hold
        runtime.write_info(d, runtime.RuntimeInfo(instance, "fake", fake.pid, 1,
                                                  runtime.endpoint(d, runtime.CONTROL_SOCKET),
                                                  runtime.endpoint(d, runtime.EVENTS_SOCKET), time.time()))
        with pytest.raises(ForeignError) as refused:
            Client(instance=instance, runtime_dir=runtime_dir, timeout_s=2)
        assert f"{control} is not ours to use: it is a socket owned by uid {other_user.uid} ({other_user.name})" \
            in str(refused.value)
        os.chown(control, os.getuid(), os.getgid(), follow_symlinks=False)  # the file is ours, the listener is not
        with pytest.raises(ForeignError) as refused:
            Client(instance=instance, runtime_dir=runtime_dir, timeout_s=2)
        assert str(refused.value) == (
            f"the process listening at {control} is pid {fake.pid} of uid {other_user.uid} ({other_user.name}), but "
            f"{d / runtime.INFO_FILE} names pid {fake.pid} of {ME}: not our coordinator")
    finally:
        fake.kill()
        shutil.rmtree(stage)


# ---------------------------------------------------------------- case 9: instance names and path lengths


@pytest.mark.parametrize("name", [".", "..", ".x"])
def test_dot_instance_names_are_refused(name, runtime_dir):
    message = f"instance name {name!r} must be 1-48 characters of [A-Za-z0-9_.-] and must not start with '.'"
    tmp_before, dir_before = os.stat("/tmp"), owner_of(runtime_dir)
    assert_refused(serve_cli("--instance", name, "--runtime-dir", str(runtime_dir)), message)
    assert (os.stat("/tmp").st_mode, os.stat("/tmp").st_uid) == (tmp_before.st_mode, tmp_before.st_uid)
    assert owner_of(runtime_dir) == dir_before and list(runtime_dir.iterdir()) == []
    with pytest.raises(ConfigError) as refused:
        Client(instance=name, runtime_dir=runtime_dir, timeout_s=2)
    assert str(refused.value) == message and refused.value.code == ErrorCode.BAD_REQUEST


def test_runtime_paths_too_long_for_a_socket_are_refused(instance, runtime_dir):
    room = runtime.MAX_SOCKET_PATH - len(f"{runtime_dir}//{instance}/{runtime.LONGEST_SOCKET_NAME}")
    fits, too_long = runtime_dir / ("d" * room), runtime_dir / ("d" * (room + 1))
    sock = f"{too_long}/{instance}/{runtime.LONGEST_SOCKET_NAME}"
    message = (f"runtime_dir {too_long} is too long: the socket path {sock} would be 108 bytes, a unix socket "
               "path holds at most 107; choose a shorter runtime directory")
    assert_refused(serve_cli("--instance", instance, "--runtime-dir", str(too_long)), message)
    assert not too_long.exists()
    with pytest.raises(ConfigError) as refused:
        Client(instance=instance, runtime_dir=too_long, timeout_s=2)
    assert str(refused.value) == message
    coordinator = CoordinatorProcess(instance, fits).start()  # the longest path that fits works, worker socket too
    try:
        assert len(f"{fits}/{instance}/{runtime.LONGEST_SOCKET_NAME}") == 107
        with Client(instance=instance, runtime_dir=fits, timeout_s=5) as client:
            assert client.stats().pid == coordinator.proc.pid
    finally:
        assert coordinator.stop() == 0


# ---------------------------------------------------------------- case 13: values and the tools as another user


BAD_VALUES = [
    (["--cpu-cache-gb", "nan"], {}, None, "cpu_cache_gb must be a finite number, got nan"),
    (["--cpu-cache-gb", "inf"], {}, None, "cpu_cache_gb must be a finite number, got inf"),
    ([], {}, "lease_ms = 1e400\n", "lease_ms must be an integer, got inf"),
    ([], {}, "[kvbm]\nlease_ms = 1500.5\n", "lease_ms must be an integer, got 1500.5"),
    ([], {}, "disk_cache_gb = nan\n", "disk_cache_gb must be a finite number, got nan"),
    ([], {"KVBM_MAX_FRAME_BYTES": "-1"}, None, "max_frame_bytes must be between 4096 and 4294967296, got -1"),
    ([], {"KVBM_LEASE_MS": "5e3"}, "metrics_port = 70000\n", "metrics_port must be between 0 and 65535, got 70000"),
    ([], {}, "transfer_workers = true\n", "transfer_workers must be an integer, got True"),
    ([], {}, 'disk_dir = "/tmp/a\\u0000b"\n', "disk_dir must be a path without NUL characters"),
    ([], {}, "kvbm = 5\n", "kvbm must be a table of options, got 5"),
    ([], {}, bytes(range(256)), "is not TOML: not UTF-8 text (invalid start byte at byte 128)"),
]


@pytest.mark.parametrize("argv,env,toml,message", BAD_VALUES)
def test_a_bad_configuration_value_is_refused_by_name(argv, env, toml, message, instance, runtime_dir):
    if toml is not None:
        path = runtime_dir / "bad.toml"
        path.write_bytes(toml if isinstance(toml, bytes) else toml.encode())
        argv = [*argv, "--config", str(path)]
    done = serve_cli("--instance", instance, "--runtime-dir", str(runtime_dir), *argv, env=env)
    assert_refused(done, message)
    assert done.stdout == "" and done.stderr.count("\n") == 1
    assert list(runtime_dir.iterdir()) == ([path] if toml is not None else [])


def test_bad_flags_and_client_values_are_refused_by_name(instance, runtime_dir):
    done = serve_cli("--instance", instance, "--runtime-dir", str(runtime_dir), "--lease-ms", "1e400")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == "kvbm-shm serve: lease_ms must be an integer, got '1e400'\n"
    for key, value, message in (("KVBM_TIMEOUT_S", "nan", "timeout_s must be a finite number, got 'nan'"),
                                ("KVBM_COPY_THREADS", "2.5", "copy_threads must be an integer, got '2.5'")):
        with pytest.raises(ConfigError) as refused:
            ClientConfig.load(env={key: value})
        assert str(refused.value) == message
    assert ServiceConfig.load(env={"KVBM_LEASE_MS": "2e3"}, overrides={"runtime_dir": runtime_dir}).lease_ms == 2000


def test_ls_and_gc_as_another_user_say_what_they_cannot_read(other_user, coordinator, instance, runtime_dir):
    kv = engine.make_kv(1)
    with engine.connect(instance, runtime_dir) as client:
        client.register_layout(engine.namespace(kv))
    segment = SHM_DIR / pool_name(instance, 0)
    unreadable = f"{runtime_dir}: Permission denied (a directory owned by {ME}, mode 0700)"
    rc, out, err = other_user.call(run_main, ["ls", "--runtime-dir", str(runtime_dir)])
    assert rc == 0 and err == f"kvbm-shm ls: cannot read {unreadable}\n"
    (row,) = [line for line in out.splitlines() if line.startswith(segment.name + " ")]
    assert f"FOREIGN ({user_name(os.getuid())}, uid {os.getuid()})" in row
    rc, out, err = other_user.call(run_main, ["gc", "--runtime-dir", str(runtime_dir)])
    assert rc == 0 and err == ""
    assert f"kept {runtime_dir}: cannot read it: Permission denied (a directory owned by {ME}, mode 0700)" in out
    assert f"kept {segment}: not ours: {segment} is not ours to use: it is a regular file owned by {ME}" in out
    rc, out, err = other_user.call(run_main, ["gc", "--runtime-dir", str(runtime_dir), "--json"])
    report = json.loads(out)
    assert rc == 0 and report["removed"] == []
    assert segment.exists() and coordinator.proc.poll() is None
    with engine.connect(instance, runtime_dir) as client:
        assert client.register_layout(engine.namespace(kv)).segment.name == segment.name
