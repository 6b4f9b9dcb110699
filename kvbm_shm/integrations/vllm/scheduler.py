"""Scheduler side of the vLLM connector: decide what each step loads from and stores to the service.

Runs in vLLM's engine-core process, on the scheduler's thread. It moves no bytes: it asks the
service which blocks exist and tells the worker side what to copy, in `KvbmShmMetadata`.

Block identity: the chained hashes of a request's full blocks (`kvbm_shm.hashing`), seeded with
the request's `cache_salt` and LoRA name; the pool is the engine's namespace. vLLM's own block
hashes are not reused (another function, another salt).

Primitives (`SchedulerSide`):
- `num_new_matched_tokens(request, num_computed_tokens)`: one `Lookup` (no pin, so no side effect
  but recency) of the full blocks past vLLM's own hit, capped so that vLLM still computes the last
  prompt token; the hit in tokens, loaded synchronously. 0 at once while the service is down.
- `after_alloc(request, block_ids, num_external_tokens)`: remembers the request, and for a hit the
  device blocks the worker must fill.
- `build_meta(scheduler_output)`: the loads recorded since the last step, and for every scheduled
  request the full blocks this step completes (computed + scheduled tokens). Every full block is
  offered once, whether vLLM computed it or took it from its own prefix cache (the service
  deduplicates, so a block lost from the service, by eviction, a corrupted copy or a restart, is
  stored again by the next engine that has it), except the blocks just loaded from the service:
  they are there, and offering them would cost a store round trip during the hit's forward.
- `blocks_invalid(block_ids)`: the worker could not load these blocks; the requests holding them
  offer them again from there once vLLM has recomputed them.
- `finished(request)`: whether stores were handed to the worker for it; vLLM then keeps the
  request's blocks until the worker reports the stores done.
"""

from __future__ import annotations

import dataclasses
import logging

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from ...hashing import salt_for, sequence_hashes
from ..service_link import ServiceLink

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BlockTransfer:
    """Blocks of one request to copy: `hashes[i]` is held by vLLM block `block_ids[i]`."""

    req_id: str
    hashes: list[bytes]
    block_ids: list[int]


@dataclasses.dataclass
class KvbmShmMetadata(KVConnectorMetadata):
    """What the worker side does in one step (scheduler -> worker, pickled across processes)."""

    loads: list[BlockTransfer] = dataclasses.field(default_factory=list)
    stores: list[BlockTransfer] = dataclasses.field(default_factory=list)
    flush_stores: bool = False  # vLLM preempted requests: their blocks are about to be reused


@dataclasses.dataclass
class _Tracked:
    request: object  # vllm.v1.request.Request
    hashes: list[bytes]  # of the leading full blocks hashed so far
    block_ids: list[int] = dataclasses.field(default_factory=list)
    num_offered: int = 0  # leading blocks already handed to the worker to store (or skipped)
    loaded: range = range(0)  # blocks loaded from the service: not offered back to it
    stored: bool = False  # some store was handed to the worker


def _salt(request) -> bytes:
    lora = request.lora_request
    return salt_for(request.cache_salt, lora.lora_name if lora is not None else None)


class SchedulerSide:
    def __init__(self, link: ServiceLink, block_size: int):
        """`link`'s state is the pool of the engine's namespace."""
        self.link = link
        self.block_size = block_size
        self._tracked: dict[str, _Tracked] = {}
        self._matched_from: dict[str, int] = {}  # req_id -> first block of the last reported hit
        self._loads: list[BlockTransfer] = []

    def _hashes(self, request, num_blocks: int, known: list[bytes] | None = None) -> list[bytes]:
        """Hashes of the first `num_blocks` full blocks, extending `known` (a prefix of them)."""
        known = [] if known is None else known
        if num_blocks > len(known):
            start = len(known) * self.block_size
            tokens = request.all_token_ids[start:num_blocks * self.block_size]
            parent = known[-1] if known else None
            known.extend(sequence_hashes(tokens, self.block_size, salt=_salt(request), parent=parent))
        return known[:num_blocks]

    def num_new_matched_tokens(self, request, num_computed_tokens: int) -> int:
        if request.prompt_token_ids is None or not self.link.up:
            return 0
        first = num_computed_tokens // self.block_size
        last = (request.num_tokens - 1) // self.block_size  # vLLM must compute the last token
        if last <= first:
            return 0
        tracked = self._tracked.get(request.request_id)  # known when resuming a preempted request
        hashes = self._hashes(request, last, tracked.hashes if tracked else None)
        hits = self.link.call(lambda client, pool: client.lookup(pool, hashes[first:]))
        if not hits:
            return 0
        self._matched_from[request.request_id] = first
        return len(hits) * self.block_size

    def after_alloc(self, request, block_ids: list[int], num_external_tokens: int) -> None:
        req_id = request.request_id
        first = self._matched_from.pop(req_id, 0)
        tracked = self._tracked.get(req_id)
        if tracked is None:
            tracked = self._tracked[req_id] = _Tracked(request, [])
        if num_external_tokens <= 0:
            return
        n = num_external_tokens // self.block_size
        hashes = self._hashes(request, first + n, tracked.hashes)
        tracked.loaded = range(first, first + n)
        self._loads.append(BlockTransfer(req_id, hashes[first:], list(block_ids[first:first + n])))

    def build_meta(self, scheduler_output):
        meta = KvbmShmMetadata(loads=self._loads, flush_stores=bool(scheduler_output.preempted_req_ids))
        self._loads = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is not None:
                tracked.block_ids = list(new.block_ids[0])
                self._offer(meta, new.req_id, tracked, new.num_computed_tokens + scheduled[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                tracked.block_ids = list(new_ids[0])
            elif new_ids is not None:
                tracked.block_ids.extend(new_ids[0])
            self._offer(meta, req_id, tracked, cached.num_computed_tokens[i] + scheduled[req_id])
        return meta

    def _offer(self, meta: KvbmShmMetadata, req_id: str, tracked: _Tracked, num_tokens_after: int) -> None:
        """Hand the worker the full blocks that exist once this step has run."""
        request = tracked.request
        full = min(num_tokens_after, len(request.all_token_ids)) // self.block_size
        if full <= tracked.num_offered or request.prompt_token_ids is None:
            return
        hashes = self._hashes(request, full, tracked.hashes)
        offered = [i for i in range(tracked.num_offered, full) if i not in tracked.loaded]
        tracked.num_offered = full
        if offered:
            meta.stores.append(BlockTransfer(req_id, [hashes[i] for i in offered],
                                             [tracked.block_ids[i] for i in offered]))
            tracked.stored = True

    def blocks_invalid(self, block_ids: set[int]) -> None:
        """Loads of these vLLM blocks failed: offer them again once vLLM has recomputed them."""
        for tracked in self._tracked.values():
            for i, b in enumerate(tracked.block_ids[:tracked.num_offered]):
                if b in block_ids:
                    tracked.num_offered = i
                    tracked.loaded = range(0)
                    break

    def finished(self, request) -> bool:
        self._matched_from.pop(request.request_id, None)
        tracked = self._tracked.pop(request.request_id, None)
        return tracked is not None and tracked.stored

