"""The NIXL agent process: this node's NIXL agent, out of the coordinator's process.

Why a process: NIXL's Python binding holds the GIL while it works. Importing it takes seconds,
and `check_xfer_state` progresses a transfer inline with the GIL held (measured: one call held it
0.6-4.7 s during a 256 MiB read over UCX/TCP). In the coordinator either would stall the loop. The
agent process maps this node's pool segments itself and registers their data regions (`map`), so
peers read them (its progress thread serves their READs) and our reads land in them; it loads
peers' metadata (`peer`) and runs our READs (`read`: `done` or `failed`).

`AgentProcess` is the coordinator's side (used by the cluster's transfer thread only): `start()`
runs `python -m kvbm_shm.cluster.agent FD NAME` in a session of its own, one end of a socket pair
as FD, and talks to it one message at a time (msgpack, never pickle). `metadata` is what a peer
needs to reach the agent; `version` changes whenever it does (a map, an unmap, a new process);
`addresses` are where each mapped segment's blocks start in the agent process (what peers read).
A process that does not answer a read by its deadline plus `_GRACE_S`, or that dies, is killed
and started again (maps and peers replayed): once it is dead no byte of a read can land any
more, so the blocks are safe to reuse and the read counts as failed. `terminate()` may be called
from another thread: it only signals the process, so a call in flight ends at once. The process
exits when the coordinator's end of the socket closes (the coordinator died or stopped).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection

import msgspec

from ..errors import ErrorCode, KvbmError

log = logging.getLogger(__name__)


class AgentError(KvbmError):
    code = ErrorCode.INTERNAL

_GRACE_S = 0.5
_PROGRESS_S = 0.002  # idle: how often the agent process lets UCX serve peers (~3% of a core)
_START_S = 120.0  # importing nixl and creating an agent on a busy machine
_versions = itertools.count(1)


class AgentProcess:
    def __init__(self, name: str):
        self.name = name
        self.agent = ""  # the NIXL agent's name, once started
        self.metadata = b""
        self.version = -1
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._maps: dict[str, str] = {}  # key -> segment name
        self.addresses: dict[str, int] = {}  # key -> address of the segment's block 0 in the agent process
        self._peers: dict[str, bytes] = {}  # agent name -> metadata

    def start(self) -> None:
        parent, child = socket.socketpair()
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "kvbm_shm.cluster.agent", str(child.fileno()),
                                           self.name], pass_fds=[child.fileno()], start_new_session=True)
        finally:
            child.close()
        self._conn = Connection(parent.detach())
        self.agent = self._ask({"op": "hello"}, time.monotonic() + _START_S)["agent"]
        for key, segment in self._maps.items():
            self.addresses[key] = self._ask({"op": "map", "key": key, "segment": segment},
                                            time.monotonic() + _START_S)["address"]
        for md in self._peers.values():
            self._ask({"op": "peer", "metadata": md}, time.monotonic() + _START_S)
        self._refresh()

    def _refresh(self) -> None:
        self.metadata = self._ask({"op": "metadata"}, time.monotonic() + _START_S)["metadata"]
        self.version = next(_versions)

    def _ask(self, msg: dict, deadline: float) -> dict:
        if self._proc is None:
            self.start()
        try:
            self._conn.send_bytes(msgspec.msgpack.encode(msg))
            if self._conn.poll(max(0.0, deadline - time.monotonic())):
                out = msgspec.msgpack.decode(self._conn.recv_bytes())
                if "error" in out:
                    raise AgentError(f"the NIXL agent process failed: {out['error']}")
                return out
            why = "did not answer in time"
        except (EOFError, OSError) as e:
            why = f"died ({e or type(e).__name__})"
        self.kill()
        raise TimeoutError(f"the NIXL agent process {why}")

    def map(self, key: str, segment: str) -> None:
        self._maps[key] = segment
        self.addresses[key] = self._ask({"op": "map", "key": key, "segment": segment},
                                        time.monotonic() + _START_S)["address"]
        self._refresh()

    def unmap(self, key: str) -> None:
        self.addresses.pop(key, None)
        if self._maps.pop(key, None) is not None and self._proc is not None:
            self._ask({"op": "unmap", "key": key}, time.monotonic() + _START_S)
            self._refresh()

    def add_peer(self, metadata: bytes) -> str:
        name = self._ask({"op": "peer", "metadata": metadata}, time.monotonic() + _START_S)["agent"]
        self._peers[name] = metadata
        return name

    def knows(self, agent: str) -> bool:
        return agent in self._peers

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
        log.debug("cluster: the agent process's own time on %d block(s): %.2f ms", len(local_ids),
                  out.get("read_s", 0) * 1000)
        if out["state"] == "stuck":  # NIXL could not cancel it: only the process's death ends it for sure
            self.kill()
            return "failed"
        return out["state"]

    def terminate(self) -> None:
        proc = self._proc
        if proc is not None:
            proc.kill()

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._conn.close()
            self._proc = self._conn = None
            self.restarts += 1
            self.version = -1

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._conn.send_bytes(msgspec.msgpack.encode({"op": "exit"}))
                self._proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self.kill()


def _main(conn: Connection, name: str) -> None:
    from .transport import NixlTransport  # nixl is imported here, never in the coordinator

    transport = NixlTransport(f"{name}-{os.getpid()}")
    segments: dict = {}
    while True:
        try:
            if not conn.poll(_PROGRESS_S):
                transport.progress()
                continue
            msg = msgspec.msgpack.decode(conn.recv_bytes())
        except (EOFError, OSError):
            break
        op = msg["op"]
        if op == "exit":
            break
        try:
            out = _do(transport, segments, msg)
        except Exception as e:  # a segment gone, a bad peer: the coordinator hears it, the process goes on
            out = {"error": f"{op}: {type(e).__name__}: {e}"}
        conn.send_bytes(msgspec.msgpack.encode(out))
    transport.close()


def _do(transport, segments: dict, msg: dict) -> dict:
    from ..shm import PoolSegment

    op = msg["op"]
    out: dict = {}
    if op == "hello":
        out["agent"] = transport.name
    elif op == "metadata":
        out["metadata"] = transport.metadata()
    elif op == "map":
        # pre-faulted here, at registration: a first read must not fault in every page it touches
        seg = segments[msg["key"]] = PoolSegment.attach(msg["segment"], table_writable=False)
        transport.register(msg["key"], seg.data_address, seg.num_blocks * seg.block_stride)
        out["address"] = seg.data_address
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
            started = time.monotonic()
            out["state"] = transport.read(msg["agent"], local, msg["remote"], msg["nbytes"],
                                          time.monotonic() + msg["timeout_s"])
            out["read_s"] = time.monotonic() - started
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _main(Connection(int(sys.argv[1])), sys.argv[2])
