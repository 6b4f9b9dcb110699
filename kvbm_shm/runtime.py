"""The runtime directory of an instance: where clients and tools find its coordinator.

    <runtime_dir>/<instance>/          0700, owned by the coordinator's user
        control.sock                   ROUTER endpoint (ipc://)
        events.sock                    PUB endpoint (ipc://)
        runtime.json                   0600: RuntimeInfo as JSON
        coordinator.lock               flock held while a coordinator lives

`claim(dir)` takes the lock or raises `KvbmError(ALREADY_RUNNING)` naming the live pid; a
dead coordinator's lock is free (the kernel drops it), so a new one takes over. `write_info`
replaces runtime.json atomically; `read_info` returns None when there is none.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path

import msgspec

from .errors import ConfigError, ErrorCode, KvbmError

CONTROL_SOCKET = "control.sock"
EVENTS_SOCKET = "events.sock"
INFO_FILE = "runtime.json"
LOCK_FILE = "coordinator.lock"


class RuntimeInfo(msgspec.Struct):
    instance: str
    instance_id: str
    pid: int
    protocol: int
    endpoint: str
    events_endpoint: str
    started_unix: float
    metrics_port: int = 0


def prepare_dir(path: Path) -> Path:
    """Create the instance directory 0700 (and its parent), refusing one we do not own."""
    path = Path(path)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create runtime directory {path}: {e.strerror}") from e
    st = path.stat()
    if st.st_uid != os.getuid():
        raise ConfigError(f"runtime directory {path} belongs to uid {st.st_uid}, not to us ({os.getuid()})")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def claim(path: Path) -> int:
    """Take the instance lock; returns the fd to keep open for the coordinator's life."""
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        info = read_info(path)
        who = f"pid {info.pid}" if info else "another process"
        raise KvbmError(f"a coordinator for instance {path.name!r} is already running ({who})",
                        ErrorCode.ALREADY_RUNNING) from None
    return fd


def endpoint(path: Path, socket: str) -> str:
    return f"ipc://{Path(path) / socket}"


def write_info(path: Path, info: RuntimeInfo) -> None:
    tmp = path / (INFO_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.encode(info))
    os.replace(tmp, path / INFO_FILE)


def read_info(path: Path) -> RuntimeInfo | None:
    try:
        return msgspec.json.decode((Path(path) / INFO_FILE).read_bytes(), type=RuntimeInfo)
    except FileNotFoundError:
        return None
    except (msgspec.DecodeError, msgspec.ValidationError, json.JSONDecodeError) as e:
        raise ConfigError(f"runtime file {Path(path) / INFO_FILE} is unreadable: {e}") from e


def remove(path: Path) -> None:
    """Remove what a coordinator put in its directory (sockets, runtime file, lock), then the directory."""
    path = Path(path)
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    for name in names:
        if name in (INFO_FILE, INFO_FILE + ".tmp", LOCK_FILE) or stat.S_ISSOCK(os.lstat(path / name).st_mode):
            try:
                os.unlink(path / name)
            except FileNotFoundError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this node and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True
