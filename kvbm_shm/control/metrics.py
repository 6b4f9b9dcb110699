"""Prometheus metrics of a coordinator, served over HTTP when `metrics_port` is set.

Runs in the coordinator process. `Metrics.start(coordinator, port, host)` serves `/metrics` over
HTTP on `host` (127.0.0.1 unless `metrics_host` says otherwise) from a thread of its own
(prometheus-client, the `tools` extra, is imported only then); `close()` stops it.

Bounds: the server never takes the coordinator down, whoever connects. At most
`MAX_HTTP_CONNECTIONS` connections are served at once (one more is closed as soon as it is
accepted, and counted in the coordinator's `refused_metrics_connections`); a connection idle for
`HTTP_IDLE_S` is closed; a failed accept (EMFILE) pauses the accept loop briefly instead of
spinning on it.

Cost:
- Off (port 0, the default) there is no `Metrics` object: the loop does nothing more.
- Most numbers are read at scrape time, on the HTTP thread, from what the coordinator keeps
  anyway: each pool's shm header counters and block table (a few vectorised numpy reads), the
  coordinator's request and error counters, the size of the lease table. Reads only: the loop is
  never locked or waited for, and nothing is counted twice.
- Per request, on the loop thread, `observe_request(msg, reply, started)` adds to plain Python
  counters (no locks, no per-block work): the handling time per op, and the transfer windows the
  coordinator sees of byte moves done by its clients: a store from allocate to commit
  (`g1_to_g2`) and a pinned load from the pinning lookup to the release of the same blocks
  (`g2_to_g1`). An engine's optimistic loads hold no pins and end unseen: they show as hits.
- `observe_transfer(path, nbytes, seconds)` hears every transfer a tier finishes: the server
  adds it as a listener of the tiers' `TierEvents` sink (`tier`), so G1 transfer jobs
  (`g1_to_g2` offload, `g2_to_g1` onboard), G3 write-back (`g2_to_g3`) and staging (`g3_to_g2`),
  and any later tier's paths are counted without the tiers knowing about metrics.

Metrics (all prefixed `kvbm_`; per pool they carry `pool` and `model` labels):
- gauges: `coordinator_info{instance,instance_id}`, `uptime_seconds`, `clients` (open leases),
  `cpu_cache_budget_bytes`, `cpu_cache_allocated_bytes`, `blocks{tier,state}` (state free,
  partial, complete, registered), `pinned_blocks{tier}`, `block_bytes`.
- counters from the pools' shared counters: `lookups_total`, `lookup_blocks_total`,
  `hit_blocks_total{tier}`, `hit_tokens_total{tier}` (hit blocks x tokens per block),
  `stored_blocks_total`, `dedup_blocks_total`, `evicted_blocks_total`, `no_room_blocks_total`,
  `freed_blocks_total`, `invalidated_blocks_total`, and
  `<name>_total` for any counter a newer pool format adds (write-backs, ...).
- coordinator counters: `requests_total`, `errors_total{code}`, `expired_leases_total`.
- `request_seconds{op}` (histogram), `transfer_bytes_total{path}`, `transfer_seconds{path}` (histogram).
- `process_*` (CPU, memory, open files) of the coordinator process.
"""

from __future__ import annotations

import bisect
import logging
import socketserver
import threading
import time
from collections import Counter
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import msgspec
import numpy as np

from .. import __version__
from .. import protocol as p
from ..errors import ConfigError
from ..layout import Namespace
from ..shm import BlockState

log = logging.getLogger(__name__)

REQUEST_BUCKETS_S = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25)
TRANSFER_BUCKETS_S = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STORE_PATH, LOAD_PATH = "g1_to_g2", "g2_to_g1"
_MAX_OPEN_WINDOWS = 1 << 16  # transfers begun by clients that never finished them (crashed) are dropped
MAX_HTTP_CONNECTIONS = 32  # scrapes served at once
HTTP_IDLE_S = 5.0  # a connection that sends nothing for this long is closed
_ACCEPT_BACKOFF_S = 0.05  # after a failed accept (EMFILE): let the coordinator's loop have the CPU

# shared pool counters -> (metric name, help); None: not exported per pool
_POOL_COUNTERS: dict[str, tuple[str, str] | None] = {
    "lookups": ("kvbm_lookups", "Lookup requests"),
    "lookup_blocks": ("kvbm_lookup_blocks", "Blocks asked for by lookups"),
    "hit_blocks": None,  # exported with a tier label, and as tokens
    "stored_blocks": ("kvbm_stored_blocks", "Blocks stored (committed) into the pool"),
    "dedup_blocks": ("kvbm_dedup_blocks", "Blocks not stored because their hash was already cached"),
    "evicted_blocks": ("kvbm_evicted_blocks", "Registered blocks evicted to make room"),
    "no_room_blocks": ("kvbm_no_room_blocks", "Blocks refused because nothing could be evicted"),
    "freed_blocks": ("kvbm_freed_blocks", "Partial blocks aborted by their writer or its ended lease"),
    "invalidated_blocks": ("kvbm_invalidated_blocks", "Blocks dropped because their bytes failed verification"),
}
_STATES = {BlockState.RESET: "free", BlockState.PARTIAL: "partial", BlockState.COMPLETE: "complete",
           BlockState.REGISTERED: "registered"}
_POOL_TIER = "g2"


class _HttpServer(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per connection, at most MAX_HTTP_CONNECTIONS of them."""

    daemon_threads = True  # a slow scraper never holds up shutdown
    request_queue_size = 128  # listen backlog: a burst of connections waits for accept, not for SYN retries
    counters: Counter  # the coordinator's, set after construction

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(MAX_HTTP_CONNECTIONS)

    def get_request(self):
        try:
            return super().get_request()
        except OSError:  # EMFILE and the like: socketserver drops this accept and polls again
            time.sleep(_ACCEPT_BACKOFF_S)
            raise

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.counters["refused_metrics_connections"] += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started (e.g. out of memory): give the slot back
            self._slots.release()
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        log.debug("metrics request from %s failed", client_address, exc_info=True)


class _QuietHandler(WSGIRequestHandler):
    timeout = HTTP_IDLE_S

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        pass


class _Histogram:
    """Bucket counts kept by one thread (the loop), read by the scrape thread."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        counts = list(self.counts)
        out, total = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), counts):
            total += n
            out.append((bound, total))
        return out


class Metrics:
    """The coordinator's metrics: per-request observations plus the scrape-time collector."""

    def __init__(self, coordinator):
        self.coordinator = coordinator
        self.registry = None  # other tiers may register their own collectors here
        self._http = None
        self._request_seconds = {
            cls: _Histogram(REQUEST_BUCKETS_S) for cls in p.Request.__args__}
        self._transfer_seconds: dict[str, _Histogram] = {}
        self._transfer_bytes: dict[str, int] = {}
        self._stores: dict[tuple[bytes, int], float] = {}  # (lease, pool) -> allocate time
        self._loads: dict[tuple[bytes, int, int], float] = {}  # (lease, pool, first block) -> pin time
        for path in (STORE_PATH, LOAD_PATH):
            self._transfer_seconds[path] = _Histogram(TRANSFER_BUCKETS_S)
            self._transfer_bytes[path] = 0

    @classmethod
    def start(cls, coordinator, port: int, addr: str = "127.0.0.1") -> "Metrics":
        """Serve /metrics on `addr:port`; ConfigError if prometheus-client is missing or the address
        cannot be bound."""
        try:
            import prometheus_client
        except ImportError:
            raise ConfigError("metrics_port needs the prometheus-client package: "
                              "pip install 'kvbm-shm[tools]'") from None
        metrics = cls(coordinator)
        metrics.registry = prometheus_client.CollectorRegistry()
        metrics.registry.register(_Collector(metrics))
        prometheus_client.ProcessCollector(namespace="kvbm", registry=metrics.registry)
        try:
            metrics._http = make_server(addr, port, prometheus_client.make_wsgi_app(metrics.registry),
                                        _HttpServer, handler_class=_QuietHandler)
        except (OSError, OverflowError) as e:  # taken, not ours to bind, or not a port number
            raise ConfigError(f"cannot serve metrics on port {port} of {addr}: "
                              f"{getattr(e, 'strerror', None) or e}") from e
        coordinator.counters["refused_metrics_connections"] += 0  # the key exists before the HTTP thread counts
        metrics._http.counters = coordinator.counters
        threading.Thread(target=metrics._http.serve_forever, args=(0.05,), name="kvbm-metrics", daemon=True).start()
        log.info("serving Prometheus metrics on http://%s:%d/metrics", addr, port)
        return metrics

    def close(self) -> None:
        """Stop serving (within one 50 ms poll of the HTTP thread)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    # ------------------------------------------------------------ loop thread

    def observe_request(self, msg: p.Request, reply, started: float) -> None:
        """One handled request (`started`: time.perf_counter() before it was handled)."""
        now = time.perf_counter()
        kind = type(msg)
        self._request_seconds[kind].observe(now - started)
        if kind is p.Allocate:
            if isinstance(reply, p.AllocateReply) and reply.block_ids and max(reply.block_ids) >= 0:
                if len(self._stores) >= _MAX_OPEN_WINDOWS:
                    self._stores.clear()
                self._stores[msg.lease, msg.pool_id] = now
        elif kind is p.Commit or kind is p.Free:
            began = self._stores.pop((msg.lease, msg.pool_id), None)
            if began is not None and kind is p.Commit and isinstance(reply, p.OkReply):
                self._transferred(STORE_PATH, msg.pool_id, len(msg.block_ids), now - began)
        elif kind is p.Lookup:
            if msg.pin and isinstance(reply, p.LookupReply) and reply.block_ids:
                if len(self._loads) >= _MAX_OPEN_WINDOWS:
                    self._loads.clear()
                self._loads[msg.lease, msg.pool_id, reply.block_ids[0]] = now
        elif kind is p.Release and msg.block_ids:
            began = self._loads.pop((msg.lease, msg.pool_id, msg.block_ids[0]), None)
            if began is not None and isinstance(reply, p.OkReply):
                self._transferred(LOAD_PATH, msg.pool_id, len(msg.block_ids), now - began)

    def observe_transfer(self, path: str, nbytes: int, seconds: float) -> None:
        """A finished transfer of `nbytes` on `path` (e.g. "g2_to_g3"), from the loop thread."""
        if path not in self._transfer_seconds:
            self._transfer_bytes[path] = 0
            self._transfer_seconds[path] = _Histogram(TRANSFER_BUCKETS_S)
        self._transfer_bytes[path] += nbytes
        self._transfer_seconds[path].observe(seconds)

    def _transferred(self, path: str, pool_id: int, num_blocks: int, seconds: float) -> None:
        pool = self.coordinator.pools.get(pool_id)
        if pool is not None:
            self.observe_transfer(path, num_blocks * pool.segment.block_bytes, seconds)


class _Collector:
    """prometheus-client custom collector: everything read at scrape time (HTTP thread)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        c = self.metrics.coordinator
        info = GaugeMetricFamily("kvbm_coordinator_info", "The coordinator serving these metrics",
                                 labels=["instance", "instance_id", "version"])
        info.add_metric([c.config.instance, c.instance_id, __version__], 1)
        yield info
        yield GaugeMetricFamily("kvbm_uptime_seconds", "Seconds since the coordinator started",
                                value=time.monotonic() - c.started)
        yield GaugeMetricFamily("kvbm_clients", "Clients connected (open leases)", value=len(c.leases))
        yield GaugeMetricFamily("kvbm_cpu_cache_budget_bytes", "G2 budget (cpu_cache_gb)",
                                value=c.config.cpu_cache_bytes)
        yield GaugeMetricFamily("kvbm_cpu_cache_allocated_bytes", "Bytes of /dev/shm held by the pools",
                                value=c.used_bytes)
        yield from self._pools(list(c.pools.values()), CounterMetricFamily, GaugeMetricFamily)
        yield from self._coordinator_counters(dict(c.counters), CounterMetricFamily)
        yield from self._observed(CounterMetricFamily, HistogramMetricFamily)
        for tier in c.tiers:
            yield from tier.metric_families(CounterMetricFamily, GaugeMetricFamily)

    def _pools(self, pools, Counter, Gauge):
        pool_labels = ["pool", "model"]
        blocks = Gauge("kvbm_blocks", "Blocks by tier and state", labels=[*pool_labels, "tier", "state"])
        pinned = Gauge("kvbm_pinned_blocks", "Blocks pinned by clients", labels=[*pool_labels, "tier"])
        block_bytes = Gauge("kvbm_block_bytes", "Bytes per block", labels=pool_labels)
        hits = Counter("kvbm_hit_blocks", "Blocks found by lookups", labels=[*pool_labels, "tier"])
        hit_tokens = Counter("kvbm_hit_tokens", "Tokens of the blocks found by lookups",
                             labels=[*pool_labels, "tier"])
        counters: dict[str, object] = {}
        tiers = self.metrics.coordinator.tiers
        for pool in pools:
            labels = [str(pool.pool_id), pool.model]
            seg = pool.segment
            states = np.bincount(pool.segment.table["state"], minlength=len(_STATES))
            for state, name in _STATES.items():
                blocks.add_metric([*labels, _POOL_TIER, name], int(states[state]))
            pinned.add_metric([*labels, _POOL_TIER], int(np.count_nonzero(pool.segment.table["refcount"])))
            block_bytes.add_metric(labels, seg.block_bytes)
            values = pool.counters()
            hits.add_metric([*labels, _POOL_TIER], values["hit_blocks"])
            hit_tokens.add_metric([*labels, _POOL_TIER], values["hit_blocks"] * _page_size(seg))
            for tier in tiers:  # blocks other tiers supplied (G4: read from other nodes)
                supplied = tier.hits(pool.pool_id)
                if supplied is not None:
                    hits.add_metric([*labels, tier.name], supplied)
                    hit_tokens.add_metric([*labels, tier.name], supplied * _page_size(seg))
            for name, value in values.items():
                spec = _POOL_COUNTERS.get(name, (f"kvbm_{name}", f"Pool counter {name}"))
                if spec is None:
                    continue
                if spec[0] not in counters:
                    counters[spec[0]] = Counter(spec[0], spec[1], labels=pool_labels)
                counters[spec[0]].add_metric(labels, value)
        yield from (blocks, pinned, block_bytes, hits, hit_tokens, *counters.values())

    @staticmethod
    def _coordinator_counters(values: dict[str, int], Counter):
        errors = Counter("kvbm_errors", "Error replies by error code", labels=["code"])
        yield Counter("kvbm_requests", "Requests handled", value=values.pop("requests", 0))
        yield Counter("kvbm_expired_leases", "Leases ended by silence or a dead client process",
                      value=values.pop("expired_leases", 0))
        for name, value in sorted(values.items()):
            if name.startswith("error_"):
                errors.add_metric([name.removeprefix("error_")], value)
            else:
                yield Counter(f"kvbm_{name}", f"Coordinator counter {name}", value=value)
        yield errors

    def _observed(self, Counter, Histogram):
        m = self.metrics
        requests = Histogram("kvbm_request_seconds", "Time the coordinator loop spent on a request, by op",
                             labels=["op"])
        for cls, hist in m._request_seconds.items():
            requests.add_metric([cls.__struct_config__.tag], hist.buckets(), hist.sum)
        yield requests
        nbytes = Counter("kvbm_transfer_bytes", "Bytes moved, by path", labels=["path"])
        seconds = Histogram("kvbm_transfer_seconds", "Duration of transfers as the coordinator sees them, by path",
                            labels=["path"])
        for path, hist in list(m._transfer_seconds.items()):
            nbytes.add_metric([path], m._transfer_bytes.get(path, 0))
            seconds.add_metric([path], hist.buckets(), hist.sum)
        yield nbytes
        yield seconds


def _page_size(seg) -> int:
    try:
        return msgspec.msgpack.decode(seg.namespace_bytes, type=Namespace).kv.page_size
    except (msgspec.DecodeError, msgspec.ValidationError):
        return 0
