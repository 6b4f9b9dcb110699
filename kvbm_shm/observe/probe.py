"""Lease-less requests from a tool to a live coordinator.

`StatsProbe(endpoint, timeout_s).stats()` sends a `Stats` request on its own DEALER socket and
returns the `StatsReply`; it says no hello, so a tool never shows up among the coordinator's
clients and holds no lease. A coordinator that does not answer within `timeout_s` raises
`CoordinatorUnavailable`: code UNAVAILABLE when no connection was made (none listening, or its
process is stopped), TIMEOUT when the request was taken but no reply came (its loop is hung). A
late reply to an earlier call is recognised by its id and dropped.
`find_endpoint(instance_dir)` reads the runtime file and checks who listens (`runtime.trusted_info`).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import zmq

from .. import protocol as p
from .. import runtime
from ..errors import ConfigError, CoordinatorUnavailable, ErrorCode, error_from_code


def find_endpoint(instance_dir: Path) -> str:
    """The control endpoint of the instance's coordinator if we can trust it
    (`runtime.trusted_info`); CoordinatorUnavailable if none, ForeignError if not ours."""
    try:
        return runtime.trusted_info(instance_dir).endpoint
    except ConfigError as e:
        raise CoordinatorUnavailable(str(e)) from e


class StatsProbe:
    def __init__(self, endpoint: str, timeout_s: float = 1.0):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.connect(endpoint)
        self._req = itertools.count(1)

    def stats(self) -> p.StatsReply:
        req = next(self._req)
        deadline = time.monotonic() + self.timeout_s
        if not self._sock.poll(self.timeout_s * 1000, zmq.POLLOUT):
            raise CoordinatorUnavailable(f"nothing answered at {self.endpoint} within {self.timeout_s:g} s "
                                         "(no coordinator, or its process is stopped)")
        request = p.Stats(req=req)
        self._sock.send_multipart(p.encode(request), zmq.NOBLOCK)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(left * 1000):
                raise CoordinatorUnavailable(
                    f"the coordinator at {self.endpoint} took the request but did not reply "
                    f"within {self.timeout_s:g} s (its loop is hung?)", ErrorCode.TIMEOUT)
            reply = p.decode_reply(self._sock.recv_multipart())
            if reply.req != req:
                continue
            p.check_reply_kind(request, reply)
            if isinstance(reply, p.ErrorReply):
                raise error_from_code(reply.code, reply.message)
            return reply

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()

    def __enter__(self) -> "StatsProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
