"""The device tier (G1) in the coordinator: registered engine tensors and the transfers that the
transfer workers run for them. Runs on the coordinator's loop thread only; no blocking.

A `tier.Tier`: it answers the device requests itself (`handlers`), and gets by keyword only what
it uses: the `LeaseTable`, `pool_of`, the `Store` (an offload is a client's store: the other
tiers hear of it as of an engine-driven one), the transfer `WorkerGroup` (a callable: None
without transfer workers) and `TierEvents` (counters; each finished job as a transfer of its
bytes on "g1_to_g2" or "g2_to_g1"). The coordinator tracks an engine's device blocks (how many,
which a transfer touches); it never allocates or maps engine memory: a registration is checked
against a `device.view.TensorView` at address 0. Contract of the requests (`protocol`, device
tier section):

- `RegisterDevice`: the tensors must match the pool's engine layout (checked by binding them at
  address 0) and a stand-in segment must belong to this instance. Needs transfer workers. A lease
  holds at most `MAX_DEVICES_PER_LEASE` devices (CAPACITY past it).
- `Offload`: G2 blocks are allocated for the hashes not yet cached (Partial, held by the
  transfer, not by the caller's lease) and one job is submitted. When it ends: done -> the blocks
  are committed with the checksums the worker computed (Registered, a KV event); failed, the
  worker died, or the engine's lease ended meanwhile -> the blocks are freed, never Registered,
  and their positions are reported failed.
- `Onboard`: the longest cached prefix is pinned by the transfer and one job is submitted. When it
  ends the pins go; blocks that failed verification are invalidated and reported; a failed job
  reports every position (the device blocks may hold partial bytes: the engine recomputes them).
- `WaitTransfers`: answered when every listed transfer has ended, or at `timeout_ms`. A finished
  transfer is reported once, then forgotten.
- `UnregisterDevice`: no new transfers; once none is in flight, every worker closes its mappings
  (`CloseDevice` to each), then the reply. A lease that ends does the same without a reply, and
  the stand-in segments of processes that died are unlinked (`standin.reap_dead`, also every
  few seconds from `sweep`, for engines that died before saying hello).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import math
import time
from typing import Callable

from .. import protocol as p
from ..device import standin
from ..device.view import TensorView
from ..errors import CapacityError, ErrorCode, RequestError
from ..hashing import HASH_BYTES
from ..layout import Namespace
from .leases import Lease, LeaseTable
from .pool import BlockPool
from .supervisor import WorkerGroup
from .tier import Deferred, Store, Tier, TierEvents

log = logging.getLogger(__name__)

WORKER_KIND = "transfer"
OFFLOAD_PATH, ONBOARD_PATH = "g1_to_g2", "g2_to_g1"  # transfer paths (metrics)
MAX_DEVICES_PER_LEASE = 64
_REAP_EVERY_S = 5.0


@dataclasses.dataclass
class Device:
    device_id: int
    client_id: int
    pool_id: int
    spec: p.DeviceSpec
    num_device_blocks: int
    in_flight: set[int] = dataclasses.field(default_factory=set)
    closing: bool = False
    lost: bool = False  # its lease ended: nothing it offloads is registered any more
    closed: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


@dataclasses.dataclass
class Transfer:
    transfer_id: int
    client_id: int
    device_id: int
    offload: bool
    pool: BlockPool
    g2_ids: list[int]
    positions: list[int]  # each block's position in the request's batch
    priority: int = 0
    started: float = 0.0  # time.perf_counter() at submission
    status: p.TransferStatus | None = None
    ended: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


class AllDone(concurrent.futures.Future):
    """Done once every future in `futures` is, or when asked after `deadline` (monotonic seconds).

    The server loop asks `done()` of every deferred reply it holds, so the deadline is honoured
    to within one loop turn, without a timer thread."""

    def __init__(self, futures: list[concurrent.futures.Future], deadline: float = math.inf):
        super().__init__()
        self._deadline = deadline
        self._left = len(futures)
        if not futures:
            self.set_result(None)
        for f in futures:
            f.add_done_callback(self._one_done)

    def _one_done(self, _) -> None:
        self._left -= 1
        if self._left == 0 and not super().done():
            self.set_result(None)

    def done(self) -> bool:
        if not super().done() and time.monotonic() >= self._deadline:
            self.set_result(None)
        return super().done()


class DeviceTier(Tier):
    name = "g1"

    def __init__(self, *, instance: str, leases: LeaseTable, pool_of: Callable[[int], BlockPool], store: Store,
                 workers: Callable[[], WorkerGroup | None], events: TierEvents):
        self._instance = instance
        self._leases = leases
        self._pool_of = pool_of
        self._store = store
        self._group = workers
        self._events = events
        self.devices: dict[int, Device] = {}
        self.transfers: dict[int, Transfer] = {}
        self._device_ids = itertools.count(1)
        self._transfer_ids = itertools.count(1)
        self._namespaces: dict[int, Namespace] = {}
        self._next_reap = 0.0

    def handlers(self) -> dict:
        return {p.RegisterDevice: self._register, p.UnregisterDevice: self._unregister, p.Offload: self._offload,
                p.Onboard: self._onboard, p.WaitTransfers: self._wait}

    # ------------------------------------------------------------ hooks

    def attach(self, pool: BlockPool, namespace: Namespace) -> None:
        self._namespaces[pool.pool_id] = namespace

    def end_lease(self, lease: Lease) -> None:
        """The lease ended (goodbye, timeout or death): its devices close, its statuses go."""
        for device in list(self.devices.values()):
            if device.client_id == lease.client_id:
                device.lost = True
                self._start_closing(device)
        for tid in [t.transfer_id for t in self.transfers.values()
                    if t.client_id == lease.client_id and t.status is not None]:
            del self.transfers[tid]
        self._reap()

    def sweep(self, now: float) -> None:
        if now >= self._next_reap:
            self._reap()
            self._next_reap = now + _REAP_EVERY_S

    # ------------------------------------------------------------ handlers

    def _register(self, m: p.RegisterDevice) -> p.Reply:
        lease = self._leases.get(m.lease)
        pool = self._pool_of(m.pool_id)
        if self._group() is None:
            raise RequestError("this coordinator runs no transfer workers (transfer_workers=0): "
                               "use engine-driven mode")
        prefix = standin.segment_prefix(self._instance)
        for h in m.tensors:
            if isinstance(h.memory, p.ShmTensor) and not h.memory.segment.startswith(prefix):
                raise RequestError(f"stand-in segment {h.memory.segment!r} is not of this instance ({prefix}*)")
        held = sum(d.client_id == lease.client_id for d in self.devices.values())
        if held >= MAX_DEVICES_PER_LEASE:
            raise CapacityError(f"client {lease.client_id} has {held} devices registered, the most a lease may",
                                ErrorCode.CAPACITY)
        ns = self._namespaces[pool.pool_id]
        try:
            table = ns.engine_layout.bind([TensorView.of(h, 0) for h in m.tensors])
        except ValueError as e:
            raise RequestError(f"tensors do not match the pool's engine layout: {e}", ErrorCode.LAYOUT_MISMATCH) from e
        device_id = next(self._device_ids)
        spec = p.DeviceSpec(device_id=device_id, layout=ns.engine_layout, tensors=m.tensors)
        self.devices[device_id] = Device(device_id=device_id, client_id=lease.client_id, pool_id=pool.pool_id,
                                         spec=spec, num_device_blocks=table.num_device_blocks)
        kinds = sorted({type(h.memory).__name__ for h in m.tensors})
        log.info("client %d registered device %d: %d tensor(s) (%s), %d device blocks, pool %d", lease.client_id,
                 device_id, len(m.tensors), ", ".join(kinds), table.num_device_blocks, pool.pool_id)
        return p.DeviceReply(req=m.req, device_id=device_id, num_device_blocks=table.num_device_blocks)

    def _unregister(self, m: p.UnregisterDevice) -> Deferred:
        lease = self._leases.get(m.lease)
        device = self._device(m.device_id, lease, allow_closing=True)
        self._start_closing(device)
        return Deferred(req=m.req, future=device.closed, finish=lambda _: p.OkReply(req=m.req))

    def _offload(self, m: p.Offload) -> p.Reply:
        lease = self._leases.get(m.lease)
        device = self._device(m.device_id, lease)
        self._check_batch(device, m.hashes, m.device_block_ids)
        pool = self._pool_of(device.pool_id)
        ids = self._store.allocate(pool, m.hashes, lease.client_id)
        positions = [i for i, b in enumerate(ids) if b >= 0]
        if not positions:
            return p.TransferReply(req=m.req, transfer_id=0, block_ids=ids)
        t = self._submit(device, pool, True, [m.device_block_ids[i] for i in positions], [ids[i] for i in positions],
                         positions, m.priority)
        return p.TransferReply(req=m.req, transfer_id=t.transfer_id, block_ids=ids)

    def _onboard(self, m: p.Onboard) -> p.Reply:
        lease = self._leases.get(m.lease)
        device = self._device(m.device_id, lease)
        self._check_batch(device, m.hashes, m.device_block_ids)
        pool = self._pool_of(device.pool_id)
        ids = pool.lookup(m.hashes)
        if not ids:
            return p.TransferReply(req=m.req, transfer_id=0, block_ids=[])
        targets = m.device_block_ids[:len(ids)]
        if len(set(targets)) != len(targets):
            raise RequestError("device block ids repeat within the loaded prefix")
        pool.pin(ids, lease.client_id)
        t = self._submit(device, pool, False, targets, ids, list(range(len(ids))))
        return p.TransferReply(req=m.req, transfer_id=t.transfer_id, block_ids=ids)

    def _wait(self, m: p.WaitTransfers) -> p.Reply | Deferred:
        lease = self._leases.get(m.lease)
        pending = []
        for tid in m.transfer_ids:
            t = self.transfers.get(tid)
            if t is None or t.client_id != lease.client_id:
                raise RequestError(f"client {lease.client_id} has no transfer {tid} (unknown, or already reported)")
            if t.status is None:
                pending.append(t.ended)
        if not pending or m.timeout_ms <= 0:
            return self._report(m.req, m.transfer_ids)
        deadline = time.monotonic() + m.timeout_ms / 1000
        return Deferred(req=m.req, future=AllDone(pending, deadline), deadline=deadline,
                        finish=lambda _: self._report(m.req, m.transfer_ids))

    # ------------------------------------------------------------ transfers

    def _submit(self, device: Device, pool: BlockPool, offload: bool, device_ids: list[int], g2_ids: list[int],
                positions: list[int], priority: int = 0) -> Transfer:
        t = Transfer(transfer_id=next(self._transfer_ids), client_id=device.client_id, device_id=device.device_id,
                     offload=offload, pool=pool, g2_ids=g2_ids, positions=positions, priority=priority,
                     started=time.perf_counter())
        self.transfers[t.transfer_id] = t
        device.in_flight.add(t.transfer_id)
        checksums = [] if offload else pool.checksum_of(g2_ids).tolist()
        job = p.TransferJob(job_id=0, offload=offload, device=device.spec, pool_segment=pool.segment.name,
                            segment_id=pool.segment.segment_id, device_block_ids=device_ids, g2_block_ids=g2_ids,
                            checksums=checksums)
        future = self._group().submit(job)
        future.add_done_callback(lambda f: self._ended(t, f))
        self._events.count("transfers_offload" if offload else "transfers_onboard")
        return t

    def _ended(self, t: Transfer, future: concurrent.futures.Future) -> None:
        """Runs on the loop thread when the job's future resolves (worker answer, death, shutdown)."""
        done, error = None, ""
        if future.cancelled():
            error = "the coordinator shut down before the transfer ran"
        elif future.exception() is not None:
            error = str(future.exception())
        else:
            done = future.result()
            error = "" if done.ok else done.error or "the transfer worker failed the job"
        device = self.devices.get(t.device_id)
        lost = device is None or device.lost
        failed_at: list[int] = []  # indices into the job's blocks
        if t.offload:
            if error or lost or len(done.checksums) != len(t.g2_ids):
                error = error or ("the engine's lease ended" if lost else "the worker returned no checksums")
                t.pool.free(t.g2_ids)
                failed_at = list(range(len(t.g2_ids)))
            else:
                self._store.commit(t.pool, t.g2_ids, done.checksums, t.priority)
        else:
            failed_at = list(range(len(t.g2_ids))) if error else list(done.failed)
            bad = [t.g2_ids[i] for i in failed_at] if not error else []
            if bad:
                t.pool.invalidate(bad)  # bytes that failed verification: never served again
            t.pool.unpin(t.g2_ids)
        failed = [t.positions[i] for i in failed_at]
        if failed:
            self._events.count("transfer_failed_blocks", len(failed))
            log.warning("%s transfer %d of device %d: %d of %d block(s) not moved: %s",
                        "offload" if t.offload else "onboard", t.transfer_id, t.device_id, len(failed),
                        len(t.g2_ids), error or "checksum mismatch")
        nbytes = done.nbytes if done is not None else 0
        self._events.count("transfer_bytes", nbytes)
        if nbytes:
            self._events.transferred(OFFLOAD_PATH if t.offload else ONBOARD_PATH, nbytes,
                                     time.perf_counter() - t.started)
        t.status = p.TransferStatus(transfer_id=t.transfer_id, done=True, failed=failed, error=error, nbytes=nbytes)
        if lost:
            self.transfers.pop(t.transfer_id, None)  # nobody is left to collect it
        if device is not None:
            device.in_flight.discard(t.transfer_id)
            if device.closing and not device.in_flight:
                self._close(device)
        t.ended.set_result(None)

    def _report(self, req: int, transfer_ids: list[int]) -> p.TransfersReply:
        out = []
        for tid in transfer_ids:
            t = self.transfers.get(tid)
            if t is None:  # a wait that ran alongside has reported it
                out.append(p.TransferStatus(transfer_id=tid, done=True, error="reported to an earlier wait"))
            elif t.status is None:
                out.append(p.TransferStatus(transfer_id=tid, done=False))
            else:
                out.append(t.status)
                del self.transfers[tid]
        return p.TransfersReply(req=req, transfers=out)

    # ------------------------------------------------------------ devices

    def _start_closing(self, device: Device) -> None:
        if device.closing:
            return
        device.closing = True
        if not device.in_flight:
            self._close(device)

    def _close(self, device: Device) -> None:
        group = self._group()
        acks = group.broadcast(lambda: p.CloseDevice(job_id=0, device_id=device.device_id)) if group is not None else []

        def closed(_) -> None:
            self.devices.pop(device.device_id, None)
            if not device.closed.done():
                device.closed.set_result(None)
            log.info("device %d of client %d closed", device.device_id, device.client_id)

        AllDone(acks).add_done_callback(closed)

    def _device(self, device_id: int, lease: Lease, allow_closing: bool = False) -> Device:
        device = self.devices.get(device_id)
        if device is None or device.client_id != lease.client_id:
            raise RequestError(f"client {lease.client_id} has no device {device_id}", ErrorCode.UNKNOWN_DEVICE)
        if device.closing and not allow_closing:
            raise RequestError(f"device {device_id} is being unregistered", ErrorCode.UNKNOWN_DEVICE)
        return device

    @staticmethod
    def _check_batch(device: Device, hashes: list[bytes], device_block_ids: list[int]) -> None:
        if len(hashes) != len(device_block_ids):
            raise RequestError(f"{len(hashes)} hashes but {len(device_block_ids)} device blocks")
        if any(len(h) != HASH_BYTES for h in hashes):
            raise RequestError(f"sequence hashes are {HASH_BYTES} bytes")
        bad = [b for b in device_block_ids if not 0 <= b < device.num_device_blocks]
        if bad:
            raise RequestError(f"device block ids {bad[:8]} out of range (device {device.device_id} has "
                               f"{device.num_device_blocks})", ErrorCode.UNKNOWN_BLOCK)

    def _reap(self) -> None:
        standin.reap_dead(self._instance)
