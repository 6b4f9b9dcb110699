"""Worker side of the vLLM connector: copy blocks between vLLM's KV tensors and the service's pool.

Runs in each vLLM worker process (the engine process itself when vLLM runs in-process), on the
model runner's thread, plus one background thread for stores. Bytes move through the client
library's `DeviceKv`: host tensors (vLLM on CPU) in "engine" mode, where this process copies
through the shm blocks itself (checksummed, verified on load); CUDA tensors in "worker" mode,
where the service's transfer workers copy through CUDA IPC. This module decides nothing, it
carries out the scheduler side's `KvbmShmMetadata`.

Primitives (`WorkerSide`):
- `register(kv_caches)`: checks vLLM's tensors against the namespace (the layout the scheduler
  side assumed) and starts the link; once the service is up, the namespace's pool is registered
  and the tensors with it (`DeviceKv.register`; again after a coordinator restart). A mismatch
  disables the connector (logged).
- `load(meta)`: before the forward, one onboard per request, waited for (on CUDA after vLLM's
  stream has finished zeroing the new blocks).
  Blocks that did not arrive (evicted since the lookup, a corrupted copy, the service gone) are
  reported by `take_load_errors()`, so that vLLM recomputes them instead of using bad KV.
- `queue_stores(meta)`: after the forward, one store job (offload) per step for the background
  thread, which on CUDA first waits for an event recorded after the forward. The stores of a
  request whose load failed in this step are dropped: its new KV was computed over missing blocks.
- `finished(finished_req_ids)`: of the requests vLLM has finished, those whose stores are all
  done; vLLM frees their blocks then.
- `flush(timeout_s)`: wait for the queued stores (vLLM preempted requests, whose blocks it is
  about to reuse). `close()`: flush, stop the thread, close the link.
"""

from __future__ import annotations

import logging
import queue
import threading

from ...config import ClientConfig
from ...device.client import DeviceKv
from ...errors import DeviceError, KvbmError
from ...layout import EngineLayout, Namespace
from ..service_link import ServiceLink
from .layout import physical_views

log = logging.getLogger(__name__)

TRANSFER_WAIT_S = 60.0  # a transfer worker's copy; the blocks stay reserved until it is done


class WorkerSide:
    def __init__(self, config: ClientConfig, name: str, namespace: Namespace, kv_cache_config):
        self._config = config
        self._name = name
        self._namespace = namespace
        self._kv_cache_config = kv_cache_config
        self._link: ServiceLink | None = None
        self._cuda = False
        self._device_kv: DeviceKv | None = None
        self._load_errors: set[int] = set()
        self._failed_reqs: set[str] = set()  # requests whose load failed in the current step
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._queued = 0  # store jobs not finished yet
        self._outstanding: dict[str, int] = {}  # req_id -> its store jobs not finished yet
        self._finishing: set[str] = set()  # finished by vLLM, stores still running
        self._thread = threading.Thread(target=self._store_loop, name="kvbm-store", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ set-up

    def register(self, kv_caches: dict) -> None:
        views = physical_views(kv_caches, self._kv_cache_config)
        devices = {t.device.type for t in views}
        if len(devices) != 1 or not devices <= {"cpu", "cuda"}:
            log.error("kvbm-shm connector disabled: KV tensors on %s", ", ".join(sorted(devices)))
            return
        expected = self._namespace.engine_layout
        found = EngineLayout.of(views, expected.tensors[0].block_axis)
        if found != expected:
            log.error("kvbm-shm connector disabled: vLLM's KV tensors %s do not match the layout "
                      "derived from its KV cache config %s", found, expected)
            return
        self._cuda = devices == {"cuda"}
        mode = "worker" if self._cuda else "engine"
        namespace = self._namespace

        def connect(client):
            old, self._device_kv = self._device_kv, None
            if old is not None:  # registered with a coordinator that is gone
                try:
                    old.unregister()
                except KvbmError:
                    pass
            pool = client.register_layout(namespace)
            try:
                self._device_kv = DeviceKv.register(client, pool, views, mode)
            except DeviceError as e:  # these tensors cannot be shared: retrying will not help
                raise ValueError(str(e)) from e
            return self._device_kv

        self._link = ServiceLink(self._config, self._name, connect)

    def _call(self, fn):
        return None if self._link is None else self._link.call(fn)

    # ------------------------------------------------------------ loads

    def load(self, meta) -> None:
        if meta.loads and self._cuda:
            import torch

            torch.cuda.current_stream().synchronize()  # vLLM may still be zeroing these blocks
        for t in meta.loads:
            result = self._call(lambda client, kv: kv.onboard(t.hashes, t.block_ids).wait(TRANSFER_WAIT_S))
            loaded = result.loaded if result is not None else 0
            if loaded < len(t.block_ids):
                self._load_errors.update(t.block_ids[loaded:])
                self._failed_reqs.add(t.req_id)
                log.warning("request %s: %d of %d blocks not loaded from kvbm-shm, vLLM recomputes them",
                            t.req_id, len(t.block_ids) - loaded, len(t.block_ids))

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # ------------------------------------------------------------ stores

    def queue_stores(self, meta) -> None:
        failed, self._failed_reqs = self._failed_reqs, set()
        if not meta.stores:
            return
        req_ids, hashes, block_ids, seen = [], [], [], set()
        for t in meta.stores:
            req_ids.append(t.req_id)
            if t.req_id in failed:
                continue
            for h, b in zip(t.hashes, t.block_ids):
                if h not in seen:
                    seen.add(h)
                    hashes.append(h)
                    block_ids.append(b)
        written = None
        if self._cuda and hashes:
            import torch

            written = torch.cuda.Event()
            written.record()  # after this step's forward on vLLM's stream
        with self._cond:
            self._queued += 1
            for r in req_ids:
                self._outstanding[r] = self._outstanding.get(r, 0) + 1
        self._jobs.put((req_ids, hashes, block_ids, written))

    def _store_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            req_ids, hashes, block_ids, written = job
            try:
                if written is not None:
                    written.synchronize()
                if hashes:
                    self._call(lambda client, kv: kv.offload(hashes, block_ids).wait(TRANSFER_WAIT_S))
            except Exception:  # the thread's boundary: a failed store is a future miss, never a hang
                log.exception("kvbm-shm store of %d blocks failed", len(hashes))
            with self._cond:
                self._queued -= 1
                for r in req_ids:
                    self._outstanding[r] -= 1
                self._cond.notify_all()

    def finished(self, finished_req_ids: set[str]) -> set[str]:
        with self._cond:
            self._finishing.update(r for r in finished_req_ids if r in self._outstanding)
            done = {r for r in self._finishing if self._outstanding[r] == 0}
            self._finishing -= done
            for r in done:
                del self._outstanding[r]
        return done

    def flush(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._queued == 0, timeout_s)

    def close(self) -> None:
        self.flush(timeout_s=10 * self._config.timeout_s)
        self._jobs.put(None)
        self._thread.join(timeout=self._config.timeout_s)
        if self._device_kv is not None:
            try:
                self._device_kv.unregister()
            except KvbmError:
                pass
        if self._link is not None:
            self._link.close()
