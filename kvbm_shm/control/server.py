"""The coordinator process: ZeroMQ sockets and the server loop around a `Coordinator`.

`serve(config)` claims the instance's runtime directory (refusing a second live coordinator,
taking over from a dead one and adopting the pools it left), binds a ROUTER socket for requests
and a PUB socket for KV events, writes the runtime file, then loops until SIGTERM/SIGINT or
`stop()`: it answers every request (a frame it cannot decode gets an `ErrorReply`, never
silence), completes deferred replies, publishes the events of each iteration as one numbered
batch, and sweeps leases. On the way out it unlinks every segment and removes its socket files
and runtime file. A handler never blocks the loop; slow work runs as a `Deferred`: its future's
done callback writes a byte to a pipe the loop polls (from whichever thread finishes it), so a
deferred reply goes out as soon as it is ready, with no polling while it waits; a Deferred with a
`deadline` (a wait with a timeout) bounds the poll instead. Finishing a Deferred may yield
another (a lookup that a second tier stages the rest of); it waits the same way.

Bounds (a client, or any process that can reach the socket, cannot take the coordinator down):
- File descriptors: the open-file limit is raised as far as allowed at start, and control
  connections past `max_connections` are shut down as they arrive (`connections`); a connection
  that does not complete the ZMTP handshake within `HANDSHAKE_S` is dropped by libzmq.
- Memory: at most `SEND_QUEUE` replies are queued per client; a reply that does not fit (a client
  that does not read) is dropped and counted (`dropped_replies`). At most `RECV_QUEUE` requests
  are queued per client; past that libzmq stops reading from it. A frame larger than
  `4 * max_frame_bytes` makes libzmq drop the connection; a request larger than
  `max_frame_bytes` is answered FRAME_TOO_LARGE, one of other than two frames BAD_FRAME. Residual:
  libzmq buffers a whole multipart message before the loop sees any of it and has no limit on
  its number of frames, so one message of many frames (each under the frame limit) is held in
  memory until it is complete; it is then refused and freed.
- Stalls: when the loop itself was held up (stopped, swapped out, a long handler) for longer than
  a sweep interval, every lease is renewed and the queued requests are answered before any lease
  may expire, so clients never pay for the coordinator's own stall (`stalls` counts them).
- Errors: an OSError (EMFILE included) in the periodic work (sweep, worker checks, bookkeeping) is
  logged, at most once per `_ERROR_LOG_EVERY_S` per kind of work, and the loop goes on.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from typing import Callable

import zmq

from .. import protocol as p
from .. import runtime
from ..cluster.endpoint import PeerEndpoint
from ..config import ServiceConfig
from ..errors import CapacityError, ErrorCode, KvbmError
from ..shm import shm_free_bytes
from . import disk_tier
from .connections import ConnectionGuard, default_max_connections, raise_fd_limit
from .coordinator import Coordinator
from .devices import WORKER_KIND as TRANSFER_WORKERS
from .metrics import Metrics
from .supervisor import WorkerGroup
from .tier import Deferred

log = logging.getLogger(__name__)

_BATCH = 256  # requests handled per wake-up before events and timers get a turn
_FLUSH_EVERY_S = 0.002  # under load, deferred pool bookkeeping reaches shm within this (idle: ~2 ms);
# often, so that each flush is short: one every 10 ms held a loop with one client looping on 256-block
# lookups ~1 ms (p99 4-5x p50)
SEND_QUEUE = 1024  # replies queued per client (ZMQ_SNDHWM); past it replies are dropped and counted
RECV_QUEUE = 256  # requests queued per client (ZMQ_RCVHWM); past it libzmq stops reading from it
HANDSHAKE_S = 2.0  # a connection must complete the ZMTP handshake within this (ZMQ_HANDSHAKE_IVL)
_POLL_MS = 100  # longest wait of an idle loop
_STALL_DRAIN_BATCHES = 64  # after a stall, requests answered before the sweep: at most this many batches
_ERROR_LOG_EVERY_S = 10.0


class Server:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.dir = runtime.prepare_dir(config.instance_dir)
        self._lock_fd = runtime.claim(self.dir)
        self.endpoint = runtime.endpoint(self.dir, runtime.CONTROL_SOCKET)
        self.events_endpoint = runtime.endpoint(self.dir, runtime.EVENTS_SOCKET)
        self.metrics: Metrics | None = None  # only with config.metrics_port
        self._stop = threading.Event()
        self._deferred: list[tuple[bytes, Deferred]] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # a deferred reply is ready
        self._event_seq = 0
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.pub = self.ctx.socket(zmq.PUB)
        self.workers: dict[str, WorkerGroup] = {}  # worker processes by kind, for the tiers that use them
        self.coordinator = Coordinator(config, self.events_endpoint, self.workers)
        self.guard: ConnectionGuard | None = None
        self.peers = None  # the cluster endpoints (PeerEndpoint), with --cluster
        self._error_logged: dict[str, float] = {}
        try:
            if config.transfer_workers:
                self.workers[TRANSFER_WORKERS] = WorkerGroup(
                    TRANSFER_WORKERS, "kvbm_shm.workers.transfer", config.transfer_workers, self.dir, self.ctx)
            if config.disk_cache_gb > 0:
                disk = self.coordinator.open_disk_tier()
                self.workers[disk_tier.WORKER_KIND] = WorkerGroup(
                    disk_tier.WORKER_KIND, disk_tier.WORKER_MODULE, config.disk_io_workers, self.dir, self.ctx,
                    disk.worker_args())
            if config.cluster:
                self.peers = PeerEndpoint.for_config(self.ctx, config)
                self.coordinator.open_cluster_tier(self.peers)
            self.coordinator.recover()
            self._check_shm_room()
            for s in (self.router, self.pub):
                s.setsockopt(zmq.LINGER, 0)
            self.router.setsockopt(zmq.MAXMSGSIZE, 4 * config.max_frame_bytes)
            self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.router.setsockopt(zmq.SNDHWM, SEND_QUEUE)
            self.router.setsockopt(zmq.RCVHWM, RECV_QUEUE)
            self.router.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_S * 1000))
            fd_limit = raise_fd_limit()
            max_connections = config.max_connections or default_max_connections(fd_limit)
            self.guard = ConnectionGuard(self.router, self.endpoint.removeprefix("ipc://"), max_connections,
                                         self.coordinator.counters)
            log.info("open-file limit %d; at most %d control connections", fd_limit, max_connections)
            self.router.bind(self.endpoint)
            self.pub.bind(self.events_endpoint)
            if config.metrics_port:
                self.metrics = Metrics.start(self.coordinator, config.metrics_port, config.metrics_host)
                self.coordinator.events.on_transfer(self.metrics.observe_transfer)
            runtime.write_info(self.dir, runtime.RuntimeInfo(
                instance=config.instance, instance_id=self.coordinator.instance_id, pid=os.getpid(),
                protocol=p.PROTOCOL_VERSION, endpoint=self.endpoint, events_endpoint=self.events_endpoint,
                started_unix=time.time(), metrics_port=config.metrics_port,
                cluster=f"{config.cluster_node}@{config.cluster}" if config.cluster else ""))
        except BaseException:
            self.close()
            raise

    def _check_shm_room(self) -> None:
        """Refuse to start with a budget /dev/shm cannot hold: fail now, not at the first engine."""
        have = shm_free_bytes() + self.coordinator.used_bytes
        if self.config.cpu_cache_bytes > have:
            raise CapacityError(
                f"cpu_cache_gb={self.config.cpu_cache_gb:g} asks {self.config.cpu_cache_bytes / 2**30:.2f} GiB "
                f"but /dev/shm has {have / 2**30:.2f} GiB free; lower --cpu-cache-gb or enlarge /dev/shm "
                "(docker: --shm-size)", ErrorCode.SHM_FULL)

    def stop(self) -> None:
        self._stop.set()

    def run(self, on_status: Callable[[p.StatsReply], None] | None = None, status_interval_s: float = 1.0) -> None:
        sweep_every = min(max(self.config.lease_ms / 4000, 0.02), 1.0)
        stall_after = sweep_every + _POLL_MS / 1000  # a gap between two clock readings the loop never makes itself
        next_sweep = next_status = next_flush = last = time.monotonic()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.guard.socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        groups = {group.socket: group for group in self.workers.values()}
        for sock in groups:
            poller.register(sock, zmq.POLLIN)
        if self.peers is not None:
            poller.register(self.peers.router, zmq.POLLIN)
        flush_pending = False
        while not self._stop.is_set():
            ready = poller.poll(self._poll_ms(flush_pending))
            last, stalled = self._clock(last, stall_after)
            flush_pending |= stalled
            for sock, _ in ready:
                if sock is self.router:
                    self._drain()
                    flush_pending = True
                elif sock is self.guard.socket:
                    self._survive("connection guard", self.guard.on_readable)
                elif sock == self._wake_r:
                    self._drain_wakes()
                elif self.peers is not None and sock is self.peers.router:
                    self.peers.drain(self.coordinator.handle, self.coordinator.error_reply)
                    flush_pending = True
                else:
                    self._survive(f"{groups[sock].kind} workers", groups[sock].on_readable)
            if self._deferred:
                self._complete_deferred()
            now, stalled = self._clock(last, stall_after)  # a stall just now must not reach the sweep
            last = now
            flush_pending |= stalled
            # deferred pool bookkeeping: once the loop has been idle for a moment (never between a
            # reply and a client's next request), and every _FLUSH_EVERY_S under load
            if flush_pending and (not ready or now >= next_flush):
                self._survive("pool bookkeeping", self.coordinator.flush)
                flush_pending = False
                next_flush = now + _FLUSH_EVERY_S
            if now >= next_sweep:
                self._survive("sweep", self.coordinator.sweep, now)
                for group in self.workers.values():
                    self._survive(f"{group.kind} worker check", group.check)
                next_sweep = now + sweep_every
            self._publish_events()
            if on_status is not None and now >= next_status:
                on_status(self.coordinator.handle(p.Stats(req=0)))
                next_status = now + status_interval_s

    def _poll_ms(self, flush_pending: bool) -> int:
        """How long the loop may wait: ~2 ms when bookkeeping waits for an idle moment, until the
        nearest deadline of a deferred reply, else `_POLL_MS`."""
        timeout_ms = 2 if flush_pending else _POLL_MS
        deadline = min((d.deadline for _, d in self._deferred), default=math.inf)
        if deadline < math.inf:
            timeout_ms = min(timeout_ms, max(0, math.ceil((deadline - time.monotonic()) * 1000)))
        return timeout_ms

    def _wake(self, _future=None) -> None:
        """A deferred reply's future is done (any thread): wake the loop."""
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # full: a wake is pending anyway; closed: shutting down
            pass

    def _drain_wakes(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _defer(self, identity: bytes, d: Deferred) -> None:
        self._deferred.append((identity, d))
        d.future.add_done_callback(self._wake)  # runs at once if it is done already

    def _clock(self, last: float, stall_after: float) -> tuple[float, bool]:
        """Now, and whether the loop stalled since `last` (then `_after_stall` has run)."""
        now = time.monotonic()
        if now - last <= stall_after:
            return now, False
        self._after_stall(now - last)
        return now, True

    def _after_stall(self, gap_s: float) -> None:
        """The loop was held up for `gap_s`: renew every lease, then answer what queued meanwhile."""
        self.coordinator.counters["stalls"] += 1
        n = self.coordinator.leases.renew_all()
        log.warning("the coordinator loop stalled for %.2f s: %d lease(s) renewed", gap_s, n)
        for _ in range(_STALL_DRAIN_BATCHES):
            if not self._drain():
                break

    def _drain(self) -> bool:
        """Answer up to one batch of requests; True when more are waiting."""
        for _ in range(_BATCH):
            if not self.router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return False
            frames = self.router.recv_multipart(zmq.NOBLOCK)
            identity, frames = frames[0], frames[1:]
            reply = self._answer(frames)
            if isinstance(reply, Deferred):
                self._defer(identity, reply)
            else:
                self._send(identity, reply)
        return True

    def _answer(self, frames: list[bytes]) -> p.Reply | Deferred:
        if len(frames) > 2:
            return self.coordinator.error_reply(0, KvbmError(
                f"expected [version][body], got {len(frames)} frames", ErrorCode.BAD_FRAME))
        size = sum(len(f) for f in frames)
        if size > self.config.max_frame_bytes:
            req = p.request_id(frames[1]) if len(frames) > 1 and len(frames[1]) < 64 else 0
            return self.coordinator.error_reply(req, KvbmError(
                f"request of {size} bytes exceeds max_frame_bytes {self.config.max_frame_bytes}",
                ErrorCode.FRAME_TOO_LARGE))
        try:
            msg = p.decode_request(frames)
        except KvbmError as e:
            return self.coordinator.error_reply(p.request_id(frames[1]) if len(frames) > 1 else 0, e)
        started = time.perf_counter() if self.metrics is not None else 0.0
        try:
            reply = self.coordinator.handle(msg)
        except Exception as e:  # a bug must not take the node's cache down: answer and go on
            log.exception("request %r failed", type(msg).__name__)
            reply = self.coordinator.error_reply(msg.req, KvbmError(f"internal error: {e}", ErrorCode.INTERNAL))
        if self.metrics is not None:
            self.metrics.observe_request(msg, reply, started)
        return reply

    def _survive(self, what: str, fn: Callable, *args) -> None:
        """Run periodic work; an OSError (EMFILE, ...) is logged, rate-limited, and the loop goes on."""
        try:
            fn(*args)
        except OSError as e:
            self.coordinator.counters["loop_errors"] += 1
            now = time.monotonic()
            if now >= self._error_logged.get(what, 0.0):
                log.error("%s failed: %s (going on; logged at most every %g s)", what, e, _ERROR_LOG_EVERY_S)
                self._error_logged[what] = now + _ERROR_LOG_EVERY_S

    def _complete_deferred(self) -> None:
        waiting, self._deferred = self._deferred, []
        for identity, d in waiting:
            if not d.future.done():
                self._deferred.append((identity, d))
                continue
            reply = self.coordinator.complete(d)
            if isinstance(reply, Deferred):
                self._defer(identity, reply)
            else:
                self._send(identity, reply)

    def _send(self, identity: bytes, reply: p.Reply) -> None:
        try:
            self.router.send_multipart([identity, *p.encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # gone (its lease will expire), or SEND_QUEUE replies unread
            self.coordinator.counters["dropped_replies"] += 1
            log.debug("dropping reply %d: %s", reply.req, e)

    def _publish_events(self) -> None:
        events = self.coordinator.take_events()
        if not events:
            return
        self._event_seq += 1
        batch = p.EventBatch(seq=self._event_seq, instance_id=self.coordinator.instance_id, ts_ns=time.time_ns(),
                             events=events)
        self.pub.send_multipart([p.EVENTS_TOPIC, *p.encode(batch)])
        if self.peers is not None:
            self.peers.publish([p.EVENTS_TOPIC, *p.encode(batch)])

    def close(self) -> None:
        """Unlink every segment and remove the runtime files (clean shutdown)."""
        for identity, d in self._deferred:
            d.future.cancel()
        if self.metrics is not None:
            self.metrics.close()
        for group in self.workers.values():
            group.close()
        self.coordinator.close()
        self._publish_events()  # the pools' PoolCleared: subscribers drop what they knew
        if self.guard is not None:
            self.guard.close()
        if self.peers is not None:
            self.peers.close()
        self.router.close(0)
        self.pub.close(200)  # let the last batch go out
        self.ctx.term()
        runtime.remove(self.dir)
        os.close(self._wake_r)
        os.close(self._wake_w)
        os.close(self._lock_fd)


def serve(config: ServiceConfig, on_ready: Callable[[Server], None] | None = None,
          on_status: Callable[[p.StatsReply], None] | None = None) -> None:
    """Run a coordinator in this process until SIGTERM or SIGINT."""
    server = Server(config)
    previous = {sig: signal.signal(sig, lambda *_: server.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if on_ready is not None:
            on_ready(server)
        server.run(on_status)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()
