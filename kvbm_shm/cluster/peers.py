"""Requests to a peer coordinator over its cluster control endpoint (TCP, ZeroMQ CURVE).

`PeerLink(ctx, endpoint, keys, name)` is one DEALER connection; `call(make, deadline)` sends the
request `make(lease)` builds and returns its reply, saying Hello first when it holds no lease and
again (once) when the peer answers UNKNOWN_LEASE (a lease that lapsed while idle, or a restarted
peer). A reply that does not come before `deadline` raises `PeerError(TIMEOUT)`; the link then
drops its socket (a late reply must not be taken for the next request's) and its lease (pins a
request that timed out may have taken lapse with it on the peer, after the peer's lease_ms), and
says Hello anew on the next call. An `ErrorReply` raises `PeerError` with its code. Blocking: used
only from the cluster's transfer thread, which owns its links.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Callable

import zmq

from .. import protocol as p
from ..errors import ErrorCode, KvbmError
from .keys import ClusterKeys, secure_client

MAX_REPLY_BYTES = 64 << 20


class PeerError(KvbmError):
    code = ErrorCode.UNAVAILABLE


class PeerLink:
    def __init__(self, ctx: zmq.Context, endpoint: str, keys: ClusterKeys, name: str):
        self.ctx = ctx
        self.endpoint = endpoint
        self.keys = keys
        self.name = name
        self.lease = b""
        self._ids = itertools.count(1)
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            s = self.ctx.socket(zmq.DEALER)
            s.linger = 0
            s.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
            s.setsockopt(zmq.IMMEDIATE, 1)  # never queue a request for a peer not connected
            secure_client(s, self.keys)
            s.connect(self.endpoint)
            self._sock = s
        return self._sock

    def _roundtrip(self, msg: p._Request, deadline: float) -> p.Reply:
        sock = self._socket()
        try:
            sock.send_multipart(p.encode(msg), zmq.NOBLOCK)
        except zmq.Again:  # not connected (yet): wait for the handshake within the deadline
            if not sock.poll(max(0, int((deadline - time.monotonic()) * 1000)), zmq.POLLOUT):
                self.reset()
                raise PeerError(f"peer {self.endpoint} not reachable", ErrorCode.UNAVAILABLE) from None
            sock.send_multipart(p.encode(msg), zmq.NOBLOCK)
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not sock.poll(left_ms):
                self.reset()
                raise PeerError(f"peer {self.endpoint} did not answer {type(msg).__name__} in time",
                                ErrorCode.TIMEOUT)
            reply = p.decode_reply(sock.recv_multipart(zmq.NOBLOCK))
            if reply.req == msg.req:
                p.check_reply_kind(msg, reply)
                return reply

    def call(self, make: Callable[[int, bytes], p._Request], deadline: float) -> p.Reply:
        """The reply to `make(req, lease)`; PeerError for an error reply, a timeout or no peer."""
        for attempt in range(2):
            if not self.lease:
                hello = self._roundtrip(p.Hello(req=next(self._ids), name=self.name[:p.MAX_NAME_BYTES],
                                                pid=os.getpid()), deadline)
                if isinstance(hello, p.ErrorReply):
                    raise PeerError(f"peer {self.endpoint} refused hello: {hello.message}", ErrorCode(hello.code))
                self.lease = hello.lease
            reply = self._roundtrip(make(next(self._ids), self.lease), deadline)
            if isinstance(reply, p.ErrorReply):
                if reply.code == ErrorCode.UNKNOWN_LEASE and attempt == 0:
                    self.lease = b""
                    continue
                raise PeerError(f"peer {self.endpoint}: {reply.message}", _code(reply.code))
            return reply
        raise AssertionError("unreachable")

    def reset(self) -> None:
        self.lease = b""
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def close(self) -> None:
        self.reset()


def _code(value: int) -> ErrorCode:
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.INTERNAL
