"""The connector's scheduler side against hand-written fakes of vLLM's request and scheduler output:
what it looks up, what it tells the worker to load and store, step by step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from kvbm_shm.hashing import salt_for, sequence_hashes
from kvbm_shm.integrations.vllm.scheduler import BlockTransfer, SchedulerSide
from tests.engines.tiny_llama import prompt_token_ids

BLOCK = 128


class FakeLink:
    """The service as a set of stored hashes; `up` can be switched off."""

    def __init__(self, stored=()):
        self.up = True
        self.stored = set(stored)
        self.lookups: list[list[bytes]] = []

    def call(self, fn):
        return fn(self, "pool") if self.up else None

    def lookup(self, pool, hashes):  # the client's signature
        self.lookups.append(list(hashes))
        hits = []
        for h in hashes:
            if h not in self.stored:
                break
            hits.append(len(hits))
        return hits


class FakeRequest:
    def __init__(self, req_id, tokens, cache_salt=None):
        self.request_id = req_id
        self.prompt_token_ids = list(tokens)
        self.all_token_ids = list(tokens)
        self.cache_salt = cache_salt
        self.lora_request = None

    @property
    def num_tokens(self):
        return len(self.all_token_ids)


def step(new=(), cached=(), preempted=()):
    """A SchedulerOutput: new = [(req_id, block_ids, num_computed, num_scheduled)],
    cached = [(req_id, new_block_ids or None, num_computed, num_scheduled)]."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(list(b),), num_computed_tokens=c)
                            for r, b, c, _ in new],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r for r, *_ in cached], resumed_req_ids=set(),
            new_block_ids=[None if b is None else (list(b),) for _, b, _, _ in cached],
            num_computed_tokens=[c for _, _, c, _ in cached]),
        num_scheduled_tokens={r: n for r, _, _, n in [*new, *cached]},
        preempted_req_ids=set(preempted),
    )


PROMPT = prompt_token_ids(2 * BLOCK + 44, seed=5)
HASHES = sequence_hashes(PROMPT[:2 * BLOCK], BLOCK, salt_for())


def test_hit_load_store_and_decode_blocks():
    link = FakeLink(stored=HASHES)
    side = SchedulerSide(link, BLOCK)
    req = FakeRequest("r1", PROMPT)

    assert side.num_new_matched_tokens(req, 0) == 2 * BLOCK
    assert link.lookups == [HASHES]  # the last prompt token is never offered for loading
    side.after_alloc(req, [7, 8, 9], 2 * BLOCK)
    meta = side.build_meta(step(new=[("r1", [7, 8, 9], 2 * BLOCK, 44)]))
    assert meta.loads == [BlockTransfer("r1", HASHES, [7, 8])]
    assert meta.stores == []  # the loaded blocks are in the service: not offered back
    assert not meta.flush_stores

    # decode until the third block fills: it is offered in the step that computes its last token
    for computed in range(2 * BLOCK + 44, 3 * BLOCK):
        req.all_token_ids.append(1)
        meta = side.build_meta(step(cached=[("r1", None, computed, 1)]))
        full = computed + 1 == 3 * BLOCK
        assert bool(meta.stores) == full and meta.loads == []
    third = sequence_hashes(req.all_token_ids[:3 * BLOCK], BLOCK, salt_for())[2]
    assert meta.stores == [BlockTransfer("r1", [third], [9])]
    assert side.finished(req) is True


def test_failed_load_is_offered_again_after_recompute():
    link = FakeLink(stored=HASHES)
    side = SchedulerSide(link, BLOCK)
    req = FakeRequest("r1", PROMPT)
    side.num_new_matched_tokens(req, 0)
    side.after_alloc(req, [7, 8, 9], 2 * BLOCK)
    side.build_meta(step(new=[("r1", [7, 8, 9], 2 * BLOCK, 44)]))

    side.blocks_invalid({8})  # block 1 did not load; vLLM recomputes from token 128
    meta = side.build_meta(step(cached=[("r1", None, BLOCK, 2 * BLOCK + 44 - BLOCK)]))
    assert meta.stores == [BlockTransfer("r1", HASHES[1:], [8])]
    assert side.finished(req) is True


def test_own_prefix_blocks_are_offered_loaded_ones_are_not():
    link = FakeLink(stored=HASHES[1:2])
    side = SchedulerSide(link, BLOCK)
    req = FakeRequest("r1", PROMPT)
    assert side.num_new_matched_tokens(req, BLOCK) == BLOCK  # vLLM has block 0, the service block 1
    side.after_alloc(req, [7, 8, 9], BLOCK)
    meta = side.build_meta(step(new=[("r1", [7, 8, 9], 2 * BLOCK, 44)]))
    assert meta.loads == [BlockTransfer("r1", HASHES[1:], [8])]
    assert meta.stores == [BlockTransfer("r1", HASHES[:1], [7])]
    assert side.finished(req) is True

    all_loaded = FakeRequest("r2", PROMPT)
    link.stored = set(HASHES)
    assert side.num_new_matched_tokens(all_loaded, 0) == 2 * BLOCK
    side.after_alloc(all_loaded, [4, 5, 6], 2 * BLOCK)
    meta = side.build_meta(step(new=[("r2", [4, 5, 6], 2 * BLOCK, 44)]))
    assert meta.stores == []
    assert side.finished(all_loaded) is False  # nothing handed out: vLLM may free its blocks at once


def test_miss_salt_down_and_nothing_to_store():
    link = FakeLink(stored=HASHES)
    side = SchedulerSide(link, BLOCK)

    salted = FakeRequest("s", PROMPT, cache_salt="tenant-b")
    assert side.num_new_matched_tokens(salted, 0) == 0
    assert link.lookups[-1] == sequence_hashes(PROMPT[:2 * BLOCK], BLOCK, salt_for("tenant-b"))

    assert side.num_new_matched_tokens(FakeRequest("local", PROMPT), 2 * BLOCK) == 0  # vLLM has it all
    link.up = False
    calls = len(link.lookups)
    assert side.num_new_matched_tokens(FakeRequest("down", PROMPT), 0) == 0
    assert len(link.lookups) == calls

    short = FakeRequest("short", PROMPT[:BLOCK - 1])
    side.after_alloc(short, [3], 0)
    meta = side.build_meta(step(new=[("short", [3], 0, BLOCK - 1)], preempted=["other"]))
    assert meta.stores == [] and meta.flush_stores
    assert side.finished(short) is False  # no store was handed out: vLLM may free its blocks
