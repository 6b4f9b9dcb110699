"""`KvbmShmConnector`: vLLM's KV connector API (`KVConnectorBase_V1`, vLLM 0.32) over kvbm-shm.

Runs inside vLLM, once per role: the scheduler-side instance in the engine-core process, a
worker-side instance in every worker process (both in one process when vLLM runs in-process).
The class only adapts vLLM's hooks; `scheduler.SchedulerSide` and `worker.WorkerSide` do the
work, the service (through the client library) does the rest.

Configuration, in `KVTransferConfig.kv_connector_extra_config` (all optional; the client's
`KVBM_*` environment variables apply first):
    instance, runtime_dir, endpoint   where the coordinator is (`ClientConfig`)
    timeout_s                         deadline of one request to it (default 0.5 s)
    verify_checksums                  check loaded blocks against their checksums (default true)
    namespace                         a label added to the model fingerprint
Set `kv_role="kv_both"` and `kv_load_failure_policy="recompute"`: with vLLM's default "fail", a
block that fails verification fails its request instead of being recomputed.

Guarantees: a miss costs the scheduler one lookup round trip, or nothing while the service is
down; the engine keeps serving without the service (every lookup a miss) and reconnects when it
is back; loaded bytes are verified before vLLM uses them, and blocks that did not arrive are
reported so vLLM recomputes them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

from ...config import ClientConfig
from ..service_link import ServiceLink
from .layout import UnsupportedEngine, namespace_for
from .scheduler import KvbmShmMetadata, SchedulerSide
from .worker import WorkerSide

log = logging.getLogger(__name__)

_CLIENT_KEYS = ("instance", "runtime_dir", "endpoint", "timeout_s", "verify_checksums")
DEFAULT_TIMEOUT_S = 0.5


class KvbmShmConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        overrides = {k: extra[k] for k in _CLIENT_KEYS if k in extra}
        if "timeout_s" not in overrides and "KVBM_TIMEOUT_S" not in os.environ:
            overrides["timeout_s"] = DEFAULT_TIMEOUT_S
        config = ClientConfig.load(**overrides)
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            log.warning("kv_load_failure_policy=%r: a block that fails verification fails its "
                        "request; use 'recompute'", self._kv_transfer_config.kv_load_failure_policy)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        block_size = vllm_config.cache_config.block_size
        engine = self._kv_transfer_config.engine_id or ""
        try:
            if role == KVConnectorRole.SCHEDULER:
                namespace = namespace_for(vllm_config, kv_cache_config, 0, extra.get("namespace", ""))
                link = ServiceLink(config, f"vllm-scheduler-{engine}-{os.getpid()}",
                                   lambda client: client.register_layout(namespace))
                self._scheduler = SchedulerSide(link, block_size)
            else:
                from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

                namespace = namespace_for(vllm_config, kv_cache_config, get_tensor_model_parallel_rank(),
                                          extra.get("namespace", ""))
                self._worker = WorkerSide(config, f"vllm-worker-{engine}-{os.getpid()}", namespace,
                                          kv_cache_config)
        except UnsupportedEngine as e:
            log.warning("kvbm-shm connector inactive: %s", e)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped store is a future miss

    # ------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._scheduler is None:
            return 0, False
        return self._scheduler.num_new_matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if self._scheduler is not None:
            self._scheduler.after_alloc(request, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KvbmShmMetadata:
        if self._scheduler is None:
            return KvbmShmMetadata()
        return self._scheduler.build_meta(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        if self._scheduler is not None and connector_output.invalid_block_ids:
            self._scheduler.blocks_invalid(connector_output.invalid_block_ids)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._scheduler is None:
            return False, None
        return self._scheduler.finished(request), None

    # ------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches) -> None:
        if self._worker is not None:
            self._worker.register(kv_caches)

    def handle_preemptions(self, kv_connector_metadata) -> None:
        if self._worker is not None and kv_connector_metadata.flush_stores:
            self._worker.flush(timeout_s=30.0)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        if self._worker is not None:
            self._worker.load(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv, before the forward

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        return  # a stored block holds every layer: stores are queued once per step

    def wait_for_save(self) -> None:
        if self._worker is not None:
            self._worker.queue_stores(self._get_connector_metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        return self._worker.finished(finished_req_ids) or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set() if self._worker is None else self._worker.take_load_errors()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.link.close()
