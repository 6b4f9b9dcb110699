"""The coordinator's file-descriptor budget: its fd limit and the control socket's connections.

Runs in the coordinator process, on its loop thread.

libzmq accepts connections on its own I/O thread, before the coordinator hears of them, and it
aborts the whole process (an assertion in its listener) when `accept` fails with EMFILE. So
EMFILE must never be reached:

- `raise_fd_limit()` raises the soft RLIMIT_NOFILE to the hard limit (and the hard limit to
  /proc/sys/fs/nr_open first, when the process may) and returns the soft limit now in force.
- `ConnectionGuard(router, socket_path, max_connections, counters)` watches the ROUTER with a
  ZeroMQ socket monitor: every accepted connection's fd is recorded (EVENT_ACCEPTED carries it),
  marked ready on EVENT_HANDSHAKE_SUCCEEDED and forgotten on EVENT_DISCONNECTED. When a connection
  arrives while `max_connections` are open, the oldest one that has not completed its ZMTP
  handshake is shut down to make room (raw connections cannot starve real clients); when every
  open one has, the new one is shut down. Shutting down is shutdown(2) on libzmq's fd, which
  libzmq then closes itself; the fd is checked first to still be a connection to
  `socket_path`. Each is counted in `counters["refused_connections"]` and logged at most once
  per `_LOG_EVERY_S`. The server polls `socket` and calls `on_readable()`.

What this guarantees, and what it does not: the guard acts after the accept, so the fds in use
can exceed `max_connections` by the connections libzmq accepted that the loop has not seen yet.
libzmq writes monitor events with a blocking send, so its I/O thread stalls (and stops accepting)
once the monitor pipe holds about two thousand unread events: the overshoot is bounded by that
pipe, not by the loop's speed. `default_max_connections` leaves room for it below the limit.
Raw connections that never complete the ZMTP handshake are dropped by libzmq after the ROUTER's
ZMQ_HANDSHAKE_IVL (the server sets it), so they free their fd on their own.
"""

from __future__ import annotations

import logging
import resource
import socket
import time
from collections import Counter

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

NR_OPEN = "/proc/sys/fs/nr_open"
RESERVED_FDS = 512  # pools, worker pipes, the metrics server, files: everything but control connections
MONITOR_BACKLOG = 2048  # connections libzmq can accept ahead of the guard (monitor pipe, see above)
_LOG_EVERY_S = 10.0


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE as far as this process may; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open(NR_OPEN) as f:
            ceiling = int(f.read())
        if hard != resource.RLIM_INFINITY and ceiling > hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, ceiling))
            hard = ceiling
    except (OSError, ValueError):  # not privileged, or no /proc: keep the hard limit we have
        pass
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
    return soft


def default_max_connections(fd_limit: int) -> int:
    """Control connections allowed under `fd_limit`: what is left after the reserve and the
    monitor backlog, at least 16 (a limit too small for that is reported by the caller)."""
    return max(16, fd_limit - RESERVED_FDS - MONITOR_BACKLOG)


class ConnectionGuard:
    def __init__(self, router: zmq.Socket, socket_path: str, max_connections: int, counters: Counter):
        self.max_connections = max_connections
        self._path = socket_path
        self._counters = counters
        self._pending: dict[int, None] = {}  # fds accepted, handshake not done yet, oldest first
        self._ready: set[int] = set()  # fds whose handshake succeeded
        self._refused_since_log = 0
        self._next_log = 0.0
        self.socket = router.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._router = router

    @property
    def connections(self) -> int:
        return len(self._pending) + len(self._ready)

    def on_readable(self) -> None:
        """Handle every monitor event waiting (the loop calls this when `socket` is readable)."""
        while True:
            try:
                event = parse_monitor_message(self.socket.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            fd, kind = event["value"], event["event"]
            if kind == zmq.EVENT_DISCONNECTED:
                self._pending.pop(fd, None)
                self._ready.discard(fd)
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if fd in self._pending:
                    del self._pending[fd]
                    self._ready.add(fd)
            elif self.connections < self.max_connections:
                self._pending[fd] = None
            elif self._pending:  # make room: the oldest that never spoke ZMTP goes
                oldest = next(iter(self._pending))
                del self._pending[oldest]
                self._refuse(oldest)
                self._pending[fd] = None
            else:
                self._refuse(fd)
        self._log_refused()

    def close(self) -> None:
        self._router.disable_monitor()
        self.socket.close(0)

    def _refuse(self, fd: int) -> None:
        # libzmq owns the fd: wrap it without a dup (no extra fd needed at the limit) and detach,
        # so that only libzmq ever closes it
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # closed already (its DISCONNECTED is on its way)
            return
        try:
            if sock.family != socket.AF_UNIX or sock.getsockname() != self._path:
                return  # the fd was closed and reused for something else: not ours to touch
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return
        finally:
            sock.detach()
        self._counters["refused_connections"] += 1
        self._refused_since_log += 1

    def _log_refused(self) -> None:
        now = time.monotonic()
        if self._refused_since_log and now >= self._next_log:
            log.warning("refused %d control connection(s): %d open, max_connections %d", self._refused_since_log,
                        self.connections, self.max_connections)
            self._refused_since_log = 0
            self._next_log = now + _LOG_EVERY_S
