"""NIXL reads of a peer's G2 blocks into ours: one READ of scattered descriptors per fetch.

`NixlTransport(name)` creates a NIXL agent (UCX backend) without NIXL's progress thread (it
polls with no delay: a whole core per process, idle or not); the owner calls `progress()` when it
has nothing else to do, which lets UCX serve peers' reads, and `read` progresses its own. Pool data
regions are registered with `register(key, address, size)` (DRAM) on both sides: the peer's, so we
may read it, ours, so the bytes may land there. `metadata()` is what a peer needs to reach this
agent; it changes with every registration, so it comes with a `version`. `add_peer(metadata)` loads
(or reloads) a peer's and returns its agent name. `read(peer, local, remote, nbytes, deadline)`
moves `nbytes` from each remote address to the local one at the same position and returns `DONE`,
`FAILED` (the transfer ended without completing: nothing more will be written) or `STUCK` (the
deadline passed and NIXL could not cancel it: the local blocks may still be written until this
process ends; `agent` then kills it).

Not thread-safe: one thread owns a transport (the agent process: `agent`). UCX reads
the usual environment (`UCX_TLS`, `UCX_NET_DEVICES`; `UCX_MODULES=^ib` where libibverbs is
installed without an RDMA device). The data plane is not authenticated by NIXL: a node that has
our metadata can read and write registered memory; only the control plane (CURVE) and checksums
protect the bytes that get served (see the README's trust model).
"""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger(__name__)

DONE, FAILED, STUCK = "done", "failed", "stuck"
_POLL_S = 0.0002


class NixlTransport:
    def __init__(self, name: str):
        from nixl._api import nixl_agent, nixl_agent_config  # optional dependency: only with --cluster

        self.name = name
        self.agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        self._regs: dict[object, object] = {}
        self._peers: dict[str, bytes] = {}  # agent name -> metadata loaded
        self.version = 0

    def register(self, key: object, address: int, size: int) -> None:
        descs = self.agent.get_reg_descs([(address, size, 0, "")], "DRAM")
        self._regs[key] = self.agent.register_memory(descs)
        self.version += 1

    def deregister(self, key: object) -> None:
        descs = self._regs.pop(key, None)
        if descs is not None:
            self.agent.deregister_memory(descs)
            self.version += 1

    def progress(self) -> None:
        """Let UCX make progress (peers' reads of our memory, connections): one non-blocking call."""
        self.agent.get_new_notifs()

    def metadata(self) -> bytes:
        return self.agent.get_agent_metadata()

    def add_peer(self, metadata: bytes) -> str:
        """Load a peer's metadata (again, if it changed); returns its agent name."""
        name = self.agent.add_remote_agent(metadata)
        name = name.decode() if isinstance(name, bytes) else name
        self._peers[name] = metadata
        return name

    def remove_peer(self, name: str) -> None:
        if self._peers.pop(name, None) is not None:
            try:
                self.agent.remove_remote_agent(name)
            except Exception as e:  # nixl raises its own types: a peer already gone is no error here
                log.debug("removing NIXL peer %s: %s", name, e)

    def knows(self, name: str) -> bool:
        return name in self._peers

    def read(self, peer: str, local: list[int], remote: list[int], nbytes: int, deadline: float) -> str:
        n = len(local)
        loc = np.column_stack([np.asarray(local, np.uint64), np.full(n, nbytes, np.uint64), np.zeros(n, np.uint64)])
        rem = np.column_stack([np.asarray(remote, np.uint64), np.full(n, nbytes, np.uint64), np.zeros(n, np.uint64)])
        try:
            handle = self.agent.initialize_xfer("READ", self.agent.get_xfer_descs(loc, "DRAM"),
                                                self.agent.get_xfer_descs(rem, "DRAM"), peer)
        except Exception as e:
            log.warning("NIXL read from %s not started: %s", peer, e)
            return FAILED
        try:
            state = self.agent.transfer(handle)
            while state == "PROC" and time.monotonic() < deadline:
                time.sleep(_POLL_S)
                state = self.agent.check_xfer_state(handle)
        except Exception as e:  # nixlRemoteDisconnectError and kin: the transfer is over
            log.warning("NIXL read from %s failed: %s", peer, e)
            state = "ERR"
        if state == "DONE":
            self._release(handle)
            return DONE
        if state == "PROC":
            log.warning("NIXL read of %d block(s) from %s passed its deadline", n, peer)
        return FAILED if self._release(handle) else STUCK

    def _release(self, handle) -> bool:
        try:
            self.agent.release_xfer_handle(handle)
            return True
        except Exception as e:
            log.warning("NIXL could not cancel a transfer: %s", e)
            return False

    def close(self) -> None:
        for name in list(self._peers):
            self.remove_peer(name)
        for key in list(self._regs):
            try:
                self.deregister(key)
            except Exception as e:
                log.debug("deregistering %r: %s", key, e)
