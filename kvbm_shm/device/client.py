"""Engine side of the device tier: register KV tensors, offload and onboard blocks, wait.

    kv = DeviceKv.register(client, pool, tensors, mode="worker")     # or mode="engine"
    t = kv.offload(hashes, device_block_ids)     # returns at once; the engine keeps computing
    result = t.wait(timeout_s=1.0)               # blocks in a ZeroMQ poll; t.done() polls once
    t = kv.onboard(hashes, device_block_ids)
    kv.unregister()                              # then the tensors may be freed

Modes, chosen per engine:
- "worker": the tensors are exported (`device.ipc`: the CPU stand-in by shm name, CUDA tensors
  by IPC handle or VMM fds) and registered with the coordinator; a transfer worker moves the
  bytes while the engine computes. Requests and waits go out on two sockets of this object
  (not the client's), so a thread blocked in `wait` holds up neither the client nor `offload`.
- "engine": the engine copies through the shm blocks itself (`Client.store` / `Client.load`);
  `offload` and `onboard` return a finished `Transfer`.
Both answer with the same `TransferResult`, so an engine can switch modes without other change.

Contract: until its transfer is done, the engine must not overwrite the device blocks it
offloads, nor use the device blocks it onboards (and must have finished writing a block before
offloading it, e.g. synchronised its stream). `TransferResult.failed` lists the positions whose
blocks were not moved: an offload registered none of them, an onboard's must be recomputed.
`unregister` returns once every worker has closed its mappings of the tensors.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Sequence

import zmq

from .. import protocol as p
from ..client import Client, EngineKv, Pool, check_allocation, check_hits
from ..errors import DeviceError, ProtocolError
from ..replies import Replies
from .ipc import Exports, export_tensors

MODES = ("worker", "engine")


@dataclasses.dataclass(frozen=True)
class TransferResult:
    offload: bool
    moved: int  # blocks copied: offload -> now registered in G2; onboard -> now in device blocks
    failed: list[int]  # positions in the batch whose blocks were not moved
    loaded: int = 0  # onboard: the first `loaded` hashes are in their device blocks
    present: int = 0  # offload: already cached, nothing to copy
    in_flight: int = 0  # offload: another writer is storing them
    no_room: int = 0  # offload: the pool had nothing to evict
    error: str = ""
    nbytes: int = 0


class Transfer:
    """One offload or onboard; `done()` polls, `wait()` blocks without spinning."""

    def __init__(self, kv: "DeviceKv", transfer_id: int, offload: bool, block_ids: list[int],
                 result: TransferResult | None = None):
        self.kv = kv
        self.transfer_id = transfer_id
        self.offload = offload
        self.block_ids = block_ids  # offload: per hash, a G2 block or a sentinel; onboard: the hit prefix
        self.result = result

    def done(self) -> bool:
        if self.result is None:
            self.kv.wait_all([self], timeout_s=0)
        return self.result is not None

    def wait(self, timeout_s: float | None = None) -> TransferResult | None:
        """The result, or None if the transfer is still running after `timeout_s` (None: no limit)."""
        if self.result is None:
            self.kv.wait_all([self], timeout_s)
        return self.result

    def _finish(self, status: p.TransferStatus) -> None:
        failed = sorted(status.failed)
        if self.offload:
            moved = sum(b >= 0 for b in self.block_ids) - len(failed)
            self.result = TransferResult(True, moved, failed, present=self.block_ids.count(p.ALREADY_STORED),
                                         in_flight=self.block_ids.count(p.IN_FLIGHT),
                                         no_room=self.block_ids.count(p.NO_ROOM), error=status.error,
                                         nbytes=status.nbytes)
        else:
            loaded = failed[0] if failed else len(self.block_ids)
            self.result = TransferResult(False, len(self.block_ids) - len(failed), failed, loaded=loaded,
                                         error=status.error, nbytes=status.nbytes)


class DeviceKv:
    """An engine's KV tensors bound to a pool, in one of the two transfer modes."""

    def __init__(self, client: Client, pool: Pool, tensors: Sequence, mode: str):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "engine" and any(getattr(getattr(t, "device", None), "type", "cpu") == "cuda" for t in tensors):
            raise DeviceError("engine-driven mode copies with the CPU copy engine (Client.store/load), which cannot "
                              "read GPU tensors: register GPU tensors in worker mode")
        self.client = client
        self.pool = pool
        self.mode = mode
        self.engine_kv: EngineKv = pool.bind(tensors)  # checks the tensors against the pool's layout
        self.device_id = 0
        self.num_device_blocks = self.engine_kv.chunks.num_device_blocks
        self._exports = Exports()
        self._ctx: zmq.Context | None = None
        self._sockets: dict[str, tuple[Replies, threading.Lock]] = {}

    @classmethod
    def register(cls, client: Client, pool: Pool, tensors: Sequence, mode: str = "worker") -> "DeviceKv":
        kv = cls(client, pool, tensors, mode)
        if mode == "engine":
            return kv
        kv._ctx = zmq.Context()
        kv._sockets = {name: (Replies(kv._socket(), client.peer), threading.Lock()) for name in ("requests", "waits")}
        try:
            handles, kv._exports = export_tensors(tensors)
            reply = kv._call(p.RegisterDevice(req=0, lease=client.lease, pool_id=pool.pool_id, tensors=handles))
        except BaseException:
            kv._exports.release()
            kv._close_sockets()
            raise
        kv.device_id = reply.device_id
        return kv

    # ------------------------------------------------------------ transfers

    def offload(self, hashes: Sequence[bytes], device_block_ids: Sequence[int], priority: int = 0) -> Transfer:
        """Device blocks -> G2, for the hashes not cached yet."""
        if self.mode == "engine":
            r = self.client.store(self.engine_kv, hashes, device_block_ids)
            result = TransferResult(True, r.stored, [], present=r.present, in_flight=r.in_flight, no_room=r.no_room,
                                    nbytes=r.stored * self.pool.block_bytes)
            return Transfer(self, 0, True, [], result)
        reply = self._call(p.Offload(req=0, lease=self.client.lease, device_id=self.device_id, hashes=list(hashes),
                                     device_block_ids=[int(b) for b in device_block_ids], priority=priority))
        check_allocation(self.pool.num_blocks, len(hashes), reply.block_ids)
        return self._transfer(reply, True)

    def onboard(self, hashes: Sequence[bytes], device_block_ids: Sequence[int]) -> Transfer:
        """The longest cached prefix of `hashes` -> these device blocks."""
        if self.mode == "engine":
            r = self.client.load(self.engine_kv, hashes, device_block_ids)
            result = TransferResult(False, r.loaded, r.failed, loaded=r.loaded, nbytes=r.loaded * self.pool.block_bytes)
            return Transfer(self, 0, False, [], result)
        reply = self._call(p.Onboard(req=0, lease=self.client.lease, device_id=self.device_id, hashes=list(hashes),
                                     device_block_ids=[int(b) for b in device_block_ids]))
        check_hits(self.pool.num_blocks, len(hashes), reply.block_ids)
        return self._transfer(reply, False)

    def wait_all(self, transfers: Sequence[Transfer], timeout_s: float | None = None) -> list[TransferResult | None]:
        """Wait until all `transfers` are done or `timeout_s` passed (0: poll once; None: no limit)."""
        pending = {t.transfer_id: t for t in transfers if t.result is None}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            left_s = 3600.0 if deadline is None else max(deadline - time.monotonic(), 0.0)
            reply = self._call(p.WaitTransfers(req=0, lease=self.client.lease, transfer_ids=list(pending),
                                               timeout_ms=int(left_s * 1000)),
                               timeout_s=left_s + self.client.config.timeout_s, socket="waits")
            for status in reply.transfers:
                t = pending.get(status.transfer_id)
                if t is None or not set(status.failed) <= set(range(len(t.block_ids))):
                    raise ProtocolError(f"transfer status {status.transfer_id} (failed {status.failed[:8]}) does not "
                                        f"fit the transfers asked for: {sorted(pending)[:8]}")
                if status.done:
                    del pending[status.transfer_id]
                    t._finish(status)
            if deadline is not None and time.monotonic() >= deadline:
                break
        return [t.result for t in transfers]

    def unregister(self) -> None:
        """Stop transfers of these tensors; returns once no worker maps them any more."""
        if self.mode == "worker" and self._sockets:
            try:
                self._call(p.UnregisterDevice(req=0, lease=self.client.lease, device_id=self.device_id),
                           timeout_s=max(self.client.config.timeout_s, 60.0))
            finally:
                self._exports.release()
                self._close_sockets()

    def __enter__(self) -> "DeviceKv":
        return self

    def __exit__(self, *exc) -> None:
        self.unregister()

    # ------------------------------------------------------------ transport

    def _transfer(self, reply: p.TransferReply, offload: bool) -> Transfer:
        t = Transfer(self, reply.transfer_id, offload, reply.block_ids)
        if reply.transfer_id == 0:  # nothing to move
            t._finish(p.TransferStatus(transfer_id=0, done=True))
        return t

    def _socket(self) -> zmq.Socket:
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IMMEDIATE, 1)
        s.setsockopt(zmq.LINGER, 200)
        s.connect(self.client.endpoint)
        return s

    def _call(self, request: p._Request, timeout_s: float | None = None, socket: str = "requests") -> p.Reply:
        replies, lock = self._sockets[socket]
        with lock:
            return replies.call(request, timeout_s or self.client.config.timeout_s)

    def _close_sockets(self) -> None:
        for replies, _ in self._sockets.values():
            replies.sock.close(0)
        self._sockets = {}
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
