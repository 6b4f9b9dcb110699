"""The runtime directory of an instance: where clients and tools find its coordinator.

    <runtime_dir>/<instance>/          0700, owned by the coordinator's user
        control.sock                   ROUTER endpoint (ipc://)
        events.sock                    PUB endpoint (ipc://)
        runtime.json                   0600: RuntimeInfo as JSON
        coordinator.lock               flock held while a coordinator lives
    (the names: `names`)

`claim(dir)` takes the lock or raises `KvbmError(ALREADY_RUNNING)` naming the live pid; a
dead coordinator's lock is free (the kernel drops it), so a new one takes over. `write_info`
replaces runtime.json atomically; `read_info` returns None when there is none.

Trust. The runtime root and the instance directory must be real directories (not symbolic
links) owned by our uid that nobody else can write, under directories only root or we can
write (or sticky ones, like /tmp): see `ownership`. `prepare_dir` (the service, `gc`) creates
them so and refuses anything else; `trusted_info(dir)` (clients, tools) checks the same, reads
runtime.json only if it is our own 0600 regular file, and checks that the process listening at
control.sock is of our uid and is the pid runtime.json names (SO_PEERCRED). Both raise
`ForeignError` naming what is wrong; `trusted_info` raises `CoordinatorUnavailable` when there is
simply no coordinator. `check_socket_room(dir)` refuses an instance directory whose socket
paths would not fit a unix socket address (107 bytes and a NUL).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket as _socket
import stat
import struct
from pathlib import Path

import msgspec

from . import ownership
from .errors import ConfigError, CoordinatorUnavailable, ErrorCode, ForeignError, KvbmError
from .names import CONTROL_SOCKET, EVENTS_SOCKET, INFO_FILE, INFO_TMP_FILE, LOCK_FILE, LONGEST_SOCKET_NAME, RUNTIME_FILES

MAX_SOCKET_PATH = 107  # bytes of a unix socket path: sun_path is 108 with the terminating NUL
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class RuntimeInfo(msgspec.Struct):
    instance: str
    instance_id: str
    pid: int
    protocol: int
    endpoint: str
    events_endpoint: str
    started_unix: float
    metrics_port: int = 0
    cluster: str = ""  # with --cluster: "NODE@etcd://HOST:PORT", this node's name and its cluster


def prepare_dir(path: Path) -> Path:
    """Create the instance directory 0700 (and its parent, the runtime root), refusing either
    when it is not ours to trust (see the module docstring)."""
    path = Path(path)
    check_socket_room(path)
    for d in (path.parent, path):
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except FileExistsError:
            pass  # not a directory, or a dangling link: check_dir says what it is
        except OSError as e:
            raise ConfigError(f"cannot create runtime directory {d}: {e.strerror}") from e
        if d == path.parent:
            ownership.check_ancestors(d)
        st = ownership.check_dir(d)
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def check_socket_room(instance_dir: Path) -> None:
    """ConfigError when the instance directory's longest socket path is too long for a unix socket."""
    longest = Path(instance_dir) / LONGEST_SOCKET_NAME
    size = len(os.fsencode(longest))
    if size > MAX_SOCKET_PATH:
        raise ConfigError(f"runtime_dir {Path(instance_dir).parent} is too long: the socket path {longest} would "
                          f"be {size} bytes, a unix socket path holds at most {MAX_SOCKET_PATH}; "
                          "choose a shorter runtime directory")


def trusted_info(instance_dir: Path, timeout_s: float = 2.0) -> RuntimeInfo:
    """The runtime file of a live coordinator we can trust (see the module docstring).

    CoordinatorUnavailable: no such directory or runtime file, or nothing listens at control.sock.
    ForeignError: a directory, the runtime file or control.sock is not ours, or the process
    listening is not of our uid or not the pid the runtime file names."""
    d = Path(instance_dir)
    try:
        ownership.check_ancestors(d.parent)
        ownership.check_dir(d.parent)
        ownership.check_dir(d)
        fd = os.open(d / INFO_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError as e:
        raise CoordinatorUnavailable(f"no coordinator of instance {d.name!r}: {e.filename} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            ownership.check_file(d / INFO_FILE, os.lstat(d / INFO_FILE))
        raise ForeignError(f"cannot read the runtime file in {d}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        ownership.check_file(d / INFO_FILE, os.fstat(f.fileno()))
        data = f.read()
    try:
        info = msgspec.json.decode(data, type=RuntimeInfo)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ConfigError(f"runtime file {d / INFO_FILE} is unreadable: {e}") from e
    control = d / CONTROL_SOCKET
    if info.endpoint != endpoint(d, CONTROL_SOCKET) and not _same_socket(info.endpoint, control):
        raise ForeignError(f"runtime file {d / INFO_FILE} names endpoint {info.endpoint}, "
                           f"not {endpoint(d, CONTROL_SOCKET)}")
    pid, uid = peer_credentials(control, timeout_s)
    if uid != os.getuid() or pid != info.pid:
        raise ForeignError(f"the process listening at {control} is pid {pid} of uid {uid} "
                           f"({ownership.user_name(uid)}), but {d / INFO_FILE} names pid {info.pid} of uid "
                           f"{os.getuid()} ({ownership.user_name(os.getuid())}): not our coordinator")
    return info


def _same_socket(endpoint_text: str, control: Path) -> bool:
    """Whether an ipc:// endpoint names `control` by another spelling of its path."""
    if not endpoint_text.startswith("ipc://"):
        return False
    try:
        return os.path.samefile(endpoint_text[len("ipc://"):], control)
    except OSError:
        return False


def peer_credentials(path: Path, timeout_s: float = 2.0) -> tuple[int, int]:
    """(pid, uid) of the process listening at unix socket `path` (SO_PEERCRED), from a connection
    that is closed at once (a ZeroMQ listener sees a peer that went away). The socket file must be
    ours (a socket of our uid); CoordinatorUnavailable if nothing listens."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CoordinatorUnavailable(f"no coordinator listens at {path}: there is no such socket") from None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        raise ForeignError(f"{path} is not ours to use: it is {ownership.describe(st)}, not a socket of uid "
                           f"{os.getuid()} ({ownership.user_name(os.getuid())})")
    with _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            raise CoordinatorUnavailable(f"no coordinator listens at {path} (its process is gone)") from None
        except TimeoutError:
            raise CoordinatorUnavailable(f"the listener at {path} did not accept within {timeout_s:g} s",
                                         ErrorCode.TIMEOUT) from None
        pid, uid, _gid = _UCRED.unpack(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED.size))
    return pid, uid


def claim(path: Path) -> int:
    """Take the instance lock; returns the fd to keep open for the coordinator's life."""
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
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
    tmp = path / INFO_TMP_FILE
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
        if name in RUNTIME_FILES or stat.S_ISSOCK(os.lstat(path / name).st_mode):
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
