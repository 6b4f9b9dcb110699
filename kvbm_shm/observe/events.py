"""Subscribing to a coordinator's KV event stream.

The coordinator publishes, on the PUB socket named `events_endpoint` in its runtime file, one
`protocol.EventBatch` per loop iteration that changed something: frames
`[b"kv"][b"kvbm/<protocol>"][msgpack batch]`, batches numbered by `seq` from 1 with no gaps while
that coordinator lives, each carrying the coordinator's `instance_id` (new on every start).

`EventStream(endpoint).receive(timeout_s)` returns the next `Received` (the batch, how many batches
were missed before it, whether the coordinator restarted since the last one) or None on timeout.
A subscriber sees only what is published after its subscription reached the coordinator (a PUB
socket keeps no history): after a gap or a restart, a KV-aware router should resynchronise, e.g.
by dropping what it knows of that instance. `to_builtins(batch)` gives JSON-ready data with
hashes as hex strings.
"""

from __future__ import annotations

import dataclasses

import msgspec
import zmq

from .. import protocol as p


@dataclasses.dataclass(frozen=True)
class Received:
    batch: p.EventBatch
    missed: int  # batches of the same coordinator lost before this one (slow subscriber)
    restarted: bool  # the coordinator is not the one of the previous batch


class EventStream:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, p.EVENTS_TOPIC)
        self._sock.connect(endpoint)
        self._last: tuple[str, int] | None = None

    def receive(self, timeout_s: float | None = None) -> Received | None:
        if not self._sock.poll(None if timeout_s is None else timeout_s * 1000):
            return None
        batch = p.decode_events(self._sock.recv_multipart())
        missed, restarted = 0, False
        if self._last is not None:
            instance_id, seq = self._last
            restarted = batch.instance_id != instance_id
            if not restarted:
                missed = max(batch.seq - seq - 1, 0)
        self._last = (batch.instance_id, batch.seq)
        return Received(batch, missed, restarted)

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def to_builtins(batch: p.EventBatch) -> dict:
    """The batch as JSON-ready data: every event with its `type`, hashes as hex strings."""
    out = msgspec.to_builtins(batch)
    out["events"] = [_event(e) for e in batch.events]
    return out


def _event(event: p.Event) -> dict:
    out = msgspec.to_builtins(event)
    if "hashes" in out:
        out["hashes"] = [h.hex() for h in event.hashes]
    return out
