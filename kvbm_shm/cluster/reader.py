"""The reader process: NIXL READs from peers into our G2 blocks, out of the coordinator's process.

Why a process: NIXL's Python binding holds the GIL while a transfer progresses inside
`check_xfer_state` (measured: one call held it 0.6-4.7 s during a 256 MiB read over UCX/TCP), which
would stall the coordinator's loop. The reader owns its own NIXL agent; it maps our pool segments
itself (`map`), loads peers' metadata (`peer`), and answers each `read` with `done` or `failed`.
A peer's agent serves reads from its progress thread without any Python, so the serving side
stays in the coordinator.

`Reader` is the coordinator's side (used by the cluster's transfer thread only): `start()` runs
`python -m kvbm_shm.cluster.reader FD` in a session of its own, one end of a socket pair as FD;
it sends one message at a time over it (msgpack, never pickle) and waits
for the answer until the read's deadline plus `_GRACE_S`. A reader that does not answer by then,
or dies, is killed and restarted: once it is dead no byte of the read can land any more, so the
blocks are safe to reuse and the read counts as failed. Peers and maps are replayed to a new one.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection

import msgspec

log = logging.getLogger(__name__)

_GRACE_S = 0.5
_START_S = 60.0  # importing nixl and creating an agent on a busy machine


class Reader:
    def __init__(self, name: str):
        self.name = name
        self._proc = None
        self._conn = None
        self._maps: dict[str, str] = {}  # key -> segment name
        self._peers: dict[str, bytes] = {}  # agent name -> metadata
        self.restarts = 0

    def start(self) -> None:
        parent, child = socket.socketpair()
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "kvbm_shm.cluster.reader", str(child.fileno()),
                                           self.name], pass_fds=[child.fileno()], start_new_session=True)
        finally:
            child.close()
        self._conn = Connection(parent.detach())
        self._ask({"op": "hello"}, time.monotonic() + _START_S)
        for key, segment in self._maps.items():
            self._ask({"op": "map", "key": key, "segment": segment}, time.monotonic() + _START_S)
        for md in self._peers.values():
            self._ask({"op": "peer", "metadata": md}, time.monotonic() + _START_S)

    def _ask(self, msg: dict, deadline: float) -> dict:
        if self._proc is None:
            self.start()
        try:
            self._conn.send_bytes(msgspec.msgpack.encode(msg))
            if self._conn.poll(max(0.0, deadline - time.monotonic())):
                return msgspec.msgpack.decode(self._conn.recv_bytes())
            why = "did not answer in time"
        except (EOFError, OSError) as e:
            why = f"died ({e})"
        self.kill()
        raise TimeoutError(f"the NIXL reader {why}")

    def map(self, key: str, segment: str) -> None:
        self._maps[key] = segment
        self._ask({"op": "map", "key": key, "segment": segment}, time.monotonic() + _START_S)

    def unmap(self, key: str) -> None:
        if self._maps.pop(key, None) is not None and self._proc is not None:
            self._ask({"op": "unmap", "key": key}, time.monotonic() + _START_S)

    def add_peer(self, metadata: bytes) -> str:
        name = self._ask({"op": "peer", "metadata": metadata}, time.monotonic() + _START_S)["agent"]
        self._peers[name] = metadata
        return name

    def remove_peer(self, agent: str) -> None:
        if self._peers.pop(agent, None) is not None and self._proc is not None:
            self._ask({"op": "forget", "agent": agent}, time.monotonic() + _START_S)

    def read(self, agent: str, key: str, local_ids: list[int], remote: list[int], nbytes: int, deadline: float) -> str:
        """`done` or `failed`; either way nothing more is written into the blocks."""
        try:
            out = self._ask({"op": "read", "agent": agent, "key": key, "ids": local_ids, "remote": remote,
                             "nbytes": nbytes, "timeout_s": max(0.0, deadline - time.monotonic())},
                            deadline + _GRACE_S)
        except TimeoutError as e:
            log.warning("cluster: %s: read of %d block(s) counted as failed", e, len(local_ids))
            return "failed"
        if out["state"] == "stuck":  # NIXL could not cancel it: only the reader's death ends it for sure
            self.kill()
            return "failed"
        return out["state"]

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._conn.close()
            self._proc = self._conn = None
            self.restarts += 1

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._conn.send_bytes(msgspec.msgpack.encode({"op": "exit"}))
                self._proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self.kill()


def _main(conn: Connection, name: str) -> None:
    from ..shm import PoolSegment
    from .transport import NixlTransport

    transport = NixlTransport(f"{name}-reader-{os.getpid()}")
    segments: dict[str, PoolSegment] = {}
    while True:
        try:
            msg = msgspec.msgpack.decode(conn.recv_bytes())
        except EOFError:
            break
        op = msg["op"]
        out: dict = {}
        if op == "exit":
            break
        if op == "map":
            seg = segments[msg["key"]] = PoolSegment.attach(msg["segment"], populate=False, table_writable=False)
            transport.register(msg["key"], seg.data_address, seg.num_blocks * seg.block_stride)
        elif op == "unmap":
            transport.deregister(msg["key"])
            seg = segments.pop(msg["key"], None)
            if seg is not None:
                seg.close()
        elif op == "peer":
            out["agent"] = transport.add_peer(msg["metadata"])
        elif op == "forget":
            transport.remove_peer(msg["agent"])
        elif op == "read":
            seg = segments.get(msg["key"])
            if seg is None:
                out["state"] = "failed"
            else:
                local = [seg.data_address + b * seg.block_stride for b in msg["ids"]]
                out["state"] = transport.read(msg["agent"], local, msg["remote"], msg["nbytes"],
                                              time.monotonic() + msg["timeout_s"])
        conn.send_bytes(msgspec.msgpack.encode(out))
    transport.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _main(Connection(int(sys.argv[1])), sys.argv[2])
