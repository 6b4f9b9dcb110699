"""Lease-less requests from a tool to a live coordinator.

`StatsProbe(endpoint, timeout_s).stats()` sends a `Stats` request on its own DEALER socket and
returns the `StatsReply`; it says no hello, so a tool never shows up among the coordinator's
clients and holds no lease. Waiting goes through `replies.Replies`: a coordinator that does not
answer within `timeout_s` raises `CoordinatorUnavailable`, code UNAVAILABLE when no connection
was made (none listening, or its process is stopped), TIMEOUT when the request was taken but no
reply came (its loop is hung); a late reply to an earlier call is dropped.
`find_endpoint(instance_dir)` reads the runtime file and checks who listens (`runtime.trusted_info`).
"""

from __future__ import annotations

from pathlib import Path

import zmq

from .. import protocol as p
from .. import runtime
from ..errors import ConfigError, CoordinatorUnavailable
from ..replies import Peer, Replies


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
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect(endpoint)
        self._replies = Replies(sock, Peer(endpoint))

    def stats(self) -> p.StatsReply:
        return self._replies.call(p.Stats(req=0), self.timeout_s)

    def close(self) -> None:
        self._replies.sock.close(0)
        self._ctx.term()

    def __enter__(self) -> "StatsProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
