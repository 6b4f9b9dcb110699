"""The coordinator's cluster endpoints: a ROUTER for peers' requests and a PUB for its KV events,
both TCP with ZeroMQ CURVE (`keys`: only holders of the cluster secret get through the handshake).

`PeerEndpoint(ctx, keys, address, port)` (or `for_config(ctx, config)`) binds both (port 0: any
free ports; else `port` and `port + 1`) and starts the context's ZAP handler. `drain(answer)`
answers up to one batch of requests with `answer(request)`; only `PEER_REQUESTS` are accepted
(anything else gets UNKNOWN_OP), a Hello's pid is taken as 0 (a peer's pid means nothing here: only
the lease timeout ends its lease), and the same bounds as the local endpoint apply: frame size, two
frames, queued replies and requests per peer, handshake time. `publish(frames)` sends an event
batch.
"""

from __future__ import annotations

import logging
from typing import Callable

import zmq

from .. import protocol as p
from ..errors import ErrorCode, KvbmError
from .keys import Authenticator, ClusterKeys, secure_server

log = logging.getLogger(__name__)

PEER_REQUESTS = (p.Hello, p.Heartbeat, p.Goodbye, p.Release, p.PeerPin, p.PeerContents)
_BATCH = 256
_SEND_QUEUE = 1024
_RECV_QUEUE = 256
_HANDSHAKE_MS = 2000
_MAX_FRAME_BYTES = 1 << 20  # a PeerPin of MAX_PEER_BLOCKS hashes is ~70 KiB


class PeerEndpoint:
    def __init__(self, ctx: zmq.Context, keys: ClusterKeys, address: str, port: int = 0):
        self.keys = keys
        self.auth = Authenticator(ctx, keys)
        self.router = ctx.socket(zmq.ROUTER)
        self.pub = ctx.socket(zmq.PUB)
        self.refused = 0
        try:
            for sock in (self.router, self.pub):
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.HANDSHAKE_IVL, _HANDSHAKE_MS)
                secure_server(sock, keys)
            self.router.setsockopt(zmq.MAXMSGSIZE, 4 * _MAX_FRAME_BYTES)
            self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.router.setsockopt(zmq.SNDHWM, _SEND_QUEUE)
            self.router.setsockopt(zmq.RCVHWM, _RECV_QUEUE)
            self.pub.setsockopt(zmq.MAXMSGSIZE, 1024)  # subscribers send only subscriptions
            host = f"[{address}]" if ":" in address else address
            if port:
                self.router.bind(f"tcp://{host}:{port}")
                self.pub.bind(f"tcp://{host}:{port + 1}")
            else:
                self.router.bind(f"tcp://{host}:0")
                self.pub.bind(f"tcp://{host}:0")
            self.control = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
            self.events = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_config(cls, ctx: zmq.Context, config) -> "PeerEndpoint":
        """The endpoints a ServiceConfig with `cluster` set asks for."""
        return cls(ctx, ClusterKeys.from_file(config.cluster_secret_file), config.advertise, config.cluster_port)

    def drain(self, answer: Callable[[p.Request], p.Reply], error: Callable[[int, KvbmError], p.Reply]) -> bool:
        """Answer up to one batch; True when more are waiting."""
        for _ in range(_BATCH):
            if not self.router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return False
            frames = self.router.recv_multipart(zmq.NOBLOCK)
            identity, frames = frames[0], frames[1:]
            reply = self._answer(frames, answer, error)
            try:
                self.router.send_multipart([identity, *p.encode(reply)], zmq.NOBLOCK)
            except zmq.ZMQError as e:
                log.debug("dropping a reply to a peer: %s", e)
        return True

    def _answer(self, frames: list[bytes], answer, error) -> p.Reply:
        if len(frames) != 2 or sum(map(len, frames)) > _MAX_FRAME_BYTES:
            self.refused += 1
            return error(0, KvbmError("a peer request is [version][body] of at most 1 MiB", ErrorCode.BAD_FRAME))
        try:
            msg = p.decode_request(frames)
        except KvbmError as e:
            self.refused += 1
            return error(p.request_id(frames[1]), e)
        if not isinstance(msg, PEER_REQUESTS):
            self.refused += 1
            return error(msg.req, KvbmError(f"{type(msg).__name__} is not served on the cluster endpoint",
                                            ErrorCode.UNKNOWN_OP))
        if isinstance(msg, p.Hello):
            msg.pid = 0
        try:
            reply = answer(msg)
        except Exception as e:  # a bug must not take the node's cache down
            log.exception("peer request %r failed", type(msg).__name__)
            return error(msg.req, KvbmError(f"internal error: {e}", ErrorCode.INTERNAL))
        if not isinstance(reply, p._Reply):  # a deferred reply: peers never get one
            return error(msg.req, KvbmError("not served on the cluster endpoint", ErrorCode.UNKNOWN_OP))
        return reply

    def publish(self, frames: list[bytes]) -> None:
        self.pub.send_multipart(frames)

    def close(self) -> None:
        self.router.close(0)
        self.pub.close(200)
        self.auth.close()
