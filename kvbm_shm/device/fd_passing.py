"""File descriptors between processes over AF_UNIX with SCM_RIGHTS (ZeroMQ cannot carry them).

Used for CUDA VMM memory, whose shareable handles are POSIX file descriptors.

- `FdServer()` (exporting process): an abstract-namespace socket (nothing in the filesystem, gone
  when the process is) served by a daemon thread. `offer(fds) -> token` makes descriptors
  available to peers presenting the token; `withdraw(token)` closes them. A peer of another uid
  is refused. One server per process: `FdServer.shared()`.
- `fetch_fds(name, token, timeout_s)` (importing process): the descriptors offered under `token`,
  as new descriptors the caller owns and must close.

Wire form: the peer sends the 16-byte token; the server answers with a 4-byte count and that many
descriptors in one message (count 0: unknown token).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import threading

from ..errors import DeviceError

log = logging.getLogger(__name__)

TOKEN_BYTES = 16
_MAX_FDS = 250  # SCM_MAX_FD is 253 on Linux
_COUNT = struct.Struct("<I")


class FdServer:
    _shared: "FdServer | None" = None
    _shared_lock = threading.Lock()

    def __init__(self):
        self.pid = os.getpid()
        self.name = f"kvbm-fds-{self.pid}-{secrets.token_hex(6)}"
        self._offers: dict[bytes, list[int]] = {}
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind("\0" + self.name)
        self._sock.listen(64)
        self._thread = threading.Thread(target=self._serve, name="kvbm-fd-server", daemon=True)
        self._thread.start()

    @classmethod
    def shared(cls) -> "FdServer":
        """This process's server, started on first use."""
        with cls._shared_lock:
            if cls._shared is None or cls._shared.pid != os.getpid():  # none yet, or forked
                cls._shared = cls()
            return cls._shared

    def offer(self, fds: list[int]) -> bytes:
        """Serve `fds` (now owned by the server) to peers presenting the returned token."""
        if len(fds) > _MAX_FDS:
            raise DeviceError(f"{len(fds)} file descriptors in one offer; at most {_MAX_FDS}")
        token = secrets.token_bytes(TOKEN_BYTES)
        with self._lock:
            self._offers[token] = list(fds)
        return token

    def withdraw(self, token: bytes) -> None:
        with self._lock:
            fds = self._offers.pop(token, [])
        for fd in fds:
            os.close(fd)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._answer(conn)
                except OSError as e:
                    log.warning("fd server: a peer went away mid-request: %s", e)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.getuid():
            log.warning("fd server: refused pid %d of uid %d", pid, uid)
            return
        token = _recv_exact(conn, TOKEN_BYTES)
        with self._lock:
            fds = list(self._offers.get(token, []))
            # sent while holding the lock: withdraw() cannot close them mid-send
            socket.send_fds(conn, [_COUNT.pack(len(fds))], fds)


def fetch_fds(name: str, token: bytes, timeout_s: float = 5.0) -> list[int]:
    """The descriptors offered under `token` by the FdServer `name`; the caller closes them."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect("\0" + name)
            sock.sendall(token)
            msg, fds, _, _ = socket.recv_fds(sock, _COUNT.size, _MAX_FDS)
        except OSError as e:
            raise DeviceError(f"cannot fetch file descriptors from {name!r} "
                              f"(is the exporting engine alive?): {e}") from e
    if len(msg) != _COUNT.size or _COUNT.unpack(msg)[0] != len(fds) or not fds:
        for fd in fds:
            os.close(fd)
        raise DeviceError(f"{name!r} has no file descriptors under this token (withdrawn, or never offered)")
    return fds


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed")
        buf += chunk
    return buf
