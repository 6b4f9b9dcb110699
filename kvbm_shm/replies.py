"""Requests and their replies on one DEALER socket: the one place a client waits for a reply.

    peer = Peer(endpoint)                       # what is known of the coordinator (after hello: more)
    replies = Replies(sock, peer)               # or AsyncReplies(async_sock, peer), awaited
    reply = replies.call(request, timeout_s)    # the checked reply, or a typed error
    replies.notify(request)                     # sent, its reply never waited for (dropped later)

Contract (both forms share it; only the waiting differs):
- Every request gets a fresh id (`request.req` is set), unique on this socket; a reply is taken
  only when it names that id. A reply naming another id is the late reply of an earlier call that
  timed out (or of a notice): it is dropped, and the wait goes on for what is left of the deadline.
- One monotonic deadline per call, covering the connection and the reply. Nothing is queued for a
  coordinator that is not connected (sockets are IMMEDIATE): no connection within the deadline is
  `CoordinatorUnavailable` with code UNAVAILABLE; a request sent but not answered in time is code
  TIMEOUT while the coordinator's process (`Peer.coordinator_pid`, from the hello reply; 0 when
  not known) lives, and UNAVAILABLE once it is gone.
- A request larger than the coordinator's `max_frame_bytes` (from the hello reply) is refused
  before sending, `ProtocolError(FRAME_TOO_LARGE)`: the coordinator would refuse it too, or drop
  the connection.
- Replies are decoded and checked: a reply that does not decode, or that is not the kind its
  request gets (`protocol.check_reply_kind`), is a `ProtocolError`; an `ErrorReply` is raised as
  the exception of its code (`errors.error_from_code`).
Not thread-safe: callers serialise calls on a socket (a lock, or one asyncio task at a time).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time

import zmq
import zmq.asyncio

from . import protocol as p
from . import runtime
from .errors import CoordinatorUnavailable, ErrorCode, ProtocolError, error_from_code

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Peer:
    """The coordinator a socket talks to, as far as the hello reply told (shared by its sockets)."""

    endpoint: str
    coordinator_pid: int = 0  # 0: not known yet
    max_frame_bytes: int = 0  # 0: no limit known yet


class _Matcher:
    """What both forms share: ids, frames, matching and checking a reply, the errors of a wait."""

    def __init__(self, peer: Peer):
        self.peer = peer
        self._ids = itertools.count(1)
        self.stale_replies = 0  # replies dropped because they named an earlier request

    def _frames(self, request: p._Request) -> list[bytes]:
        """Give the request its id; its frames, refused past the coordinator's frame limit."""
        request.req = next(self._ids)
        frames = p.encode(request)
        size = sum(len(f) for f in frames)
        if self.peer.max_frame_bytes and size > self.peer.max_frame_bytes:
            raise ProtocolError(f"{type(request).__name__} of {size} bytes exceeds the coordinator's max_frame_bytes "
                                f"{self.peer.max_frame_bytes}: send smaller batches", ErrorCode.FRAME_TOO_LARGE)
        return frames

    def _match(self, request: p._Request, frames: list) -> p.Reply | None:
        """The checked reply to `request`, or None for a stale reply (dropped)."""
        reply = p.decode_reply(frames)
        if reply.req != request.req:
            self.stale_replies += 1
            log.debug("dropped a late reply (id %d) while waiting for %s %d", reply.req, type(request).__name__,
                      request.req)
            return None
        p.check_reply_kind(request, reply)
        if isinstance(reply, p.ErrorReply):
            raise error_from_code(reply.code, reply.message)
        return reply

    def _not_connected(self, timeout_s: float) -> CoordinatorUnavailable:
        return CoordinatorUnavailable(f"no coordinator is listening at {self.peer.endpoint}: none connected within "
                                      f"{timeout_s:.3g} s (not running, or its process is stopped)")

    def _no_reply(self, request: p._Request, timeout_s: float) -> CoordinatorUnavailable:
        """TIMEOUT while the coordinator's process lives (slow or hung), UNAVAILABLE once it is gone."""
        pid = self.peer.coordinator_pid
        alive = pid <= 0 or runtime.pid_alive(pid)
        return CoordinatorUnavailable(
            f"{type(request).__name__} got no reply within {timeout_s:.3g} s from {self.peer.endpoint}"
            + ("" if alive else f" (the coordinator, pid {pid}, is gone)"),
            ErrorCode.TIMEOUT if alive else ErrorCode.UNAVAILABLE)


class Replies(_Matcher):
    """The blocking form, on a `zmq.Socket`."""

    def __init__(self, sock: zmq.Socket, peer: Peer):
        super().__init__(peer)
        self.sock = sock
        self._rcvtimeo_ms = -1

    def call(self, request: p._Request, timeout_s: float) -> p.Reply:
        deadline = time.monotonic() + timeout_s
        frames = self._frames(request)
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:  # not connected (yet): wait for the connection, within the deadline
            if not self.sock.poll(timeout_s * 1000, zmq.POLLOUT):
                raise self._not_connected(timeout_s) from None
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        while True:
            wait_ms = max(math.ceil((deadline - time.monotonic()) * 1000), 0)  # never gives up before the deadline
            if wait_ms != self._rcvtimeo_ms:  # a blocking recv with a deadline: no poll call
                self._rcvtimeo_ms = wait_ms
                self.sock.setsockopt(zmq.RCVTIMEO, wait_ms)
            try:
                received = self.sock.recv_multipart()
            except zmq.Again:
                raise self._no_reply(request, timeout_s) from None
            reply = self._match(request, received)
            if reply is not None:
                return reply

    def notify(self, request: p._Request) -> bool:
        """Send without waiting (its reply is dropped as stale later); False when not connected."""
        try:
            self.sock.send_multipart(self._frames(request), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def drain(self) -> int:
        """Drop the replies waiting on the socket (to notices); how many."""
        n = 0
        while self.sock.poll(0):
            self.sock.recv_multipart()
            n += 1
        return n


class AsyncReplies(_Matcher):
    """The asyncio form, on a `zmq.asyncio.Socket`: the same contract, awaited."""

    def __init__(self, sock: zmq.asyncio.Socket, peer: Peer):
        super().__init__(peer)
        self.sock = sock

    async def call(self, request: p._Request, timeout_s: float) -> p.Reply:
        deadline = time.monotonic() + timeout_s
        frames = self._frames(request)
        if not await self.sock.poll(timeout_s * 1000, zmq.POLLOUT):
            raise self._not_connected(timeout_s)
        await self.sock.send_multipart(frames, zmq.NOBLOCK)
        while True:
            left_s = deadline - time.monotonic()
            if left_s <= 0 or not await self.sock.poll(left_s * 1000):
                raise self._no_reply(request, timeout_s)
            reply = self._match(request, await self.sock.recv_multipart())
            if reply is not None:
                return reply

    async def notify(self, request: p._Request) -> bool:
        """Send without waiting (its reply is dropped as stale later); False when not connected."""
        try:
            await self.sock.send_multipart(self._frames(request), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False
