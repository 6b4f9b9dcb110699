"""Run a real vLLM engine (CPU) on a local model in a fresh process, for tests and benchmarks.

The test (or benchmark) process calls ``run_engine``; the engine lives in a child started with
multiprocessing ``spawn``, so every call is a new engine process with its own environment (the
end-to-end tests need engine A and engine B to be different processes). Nothing here imports
kvbm_shm; the connector under test is named through ``EngineSpec.kv_transfer_config``.

Primitives:
  - ``Prompt(token_ids, cache_salt=None)``: one request, given as token ids so tests place block
    boundaries exactly.
  - ``EngineSpec``: what engine to start: model directory, KV transfer config (a plain dict, as
    ``LLM(kv_transfer_config=...)`` takes it), vLLM's own prefix caching on or off, extra
    environment variables for the child.
  - ``run_engine(spec, batches, max_tokens=..., timeout_s=...) -> EngineRun``: starts one engine,
    serves each batch of prompts with one greedy ``LLM.generate`` call, in order, and returns the
    generated token ids, ``num_cached_tokens`` of every request and the timings (engine start,
    each generate). A child failure is re-raised here with the child's traceback; a child that
    outlives ``timeout_s`` is killed and reported.
  - ``hf_greedy(model_dir, token_ids, max_tokens)``: the reference, HF transformers' greedy
    continuation on the same model, in this process.

Engine settings fixed here (FACTS.md): float32, ``enforce_eager``, in-process engine core
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, start in seconds instead of tens of seconds), KV cache of
``VLLM_CPU_KVCACHE_SPACE=1`` GiB. The scheduler-side and worker-side connector instances then
share the engine process.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import time
import traceback
from typing import Any

ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


@dataclasses.dataclass(frozen=True)
class Prompt:
    token_ids: tuple[int, ...]
    cache_salt: str | None = None


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    model_dir: str
    kv_transfer_config: dict[str, Any] | None = None
    enable_prefix_caching: bool = True
    max_model_len: int = 4096
    env: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RequestResult:
    token_ids: tuple[int, ...]
    num_cached_tokens: int


@dataclasses.dataclass(frozen=True)
class EngineRun:
    start_s: float  # LLM(...) construction: engine start, model load, KV cache allocation
    generate_s: tuple[float, ...]  # one per batch
    results: tuple[tuple[RequestResult, ...], ...]  # results[batch][request]
    pid: int


class EngineProcessError(RuntimeError):
    """The engine child failed (message carries its traceback) or ran past its timeout."""


def _engine_main(spec: EngineSpec, batches, max_tokens: int, out: multiprocessing.Queue) -> None:
    """Child process: start the engine, serve the batches, put one ("ok"|"error", payload)."""
    try:
        os.environ.update(ENGINE_ENV)
        os.environ.update(spec.env)
        from vllm import LLM, SamplingParams

        t0 = time.perf_counter()
        llm = LLM(
            model=spec.model_dir,
            dtype="float32",
            enforce_eager=True,
            max_model_len=spec.max_model_len,
            enable_prefix_caching=spec.enable_prefix_caching,
            kv_transfer_config=spec.kv_transfer_config,
            seed=0,
        )
        start_s = time.perf_counter() - t0
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        generate_s, results = [], []
        for batch in batches:
            prompts = []
            for p in batch:
                prompt = {"prompt_token_ids": list(p.token_ids)}
                if p.cache_salt is not None:
                    prompt["cache_salt"] = p.cache_salt
                prompts.append(prompt)
            t0 = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            generate_s.append(time.perf_counter() - t0)
            results.append(tuple(
                RequestResult(tuple(o.outputs[0].token_ids), int(o.num_cached_tokens or 0))
                for o in outputs))
        out.put(("ok", EngineRun(start_s, tuple(generate_s), tuple(results), os.getpid())))
    except BaseException:  # the process boundary: report everything to the parent
        out.put(("error", traceback.format_exc()))


def run_engine(spec: EngineSpec, batches: list[list[Prompt]], *, max_tokens: int = 8,
               timeout_s: float = 300.0) -> EngineRun:
    """Start a fresh engine process, serve ``batches`` in order, return what it produced."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_engine_main, args=(spec, batches, max_tokens, out),
                        name="vllm-engine")
    child.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                status, payload = out.get(timeout=0.5)
                break
            except queue.Empty:
                if not child.is_alive():
                    raise EngineProcessError(
                        f"engine process {child.pid} died with exit code {child.exitcode} "
                        "and no result") from None
                if time.monotonic() > deadline:
                    raise EngineProcessError(
                        f"engine process {child.pid} gave no result in {timeout_s} s") from None
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
            child.join()
    if status != "ok":
        raise EngineProcessError(f"engine process failed:\n{payload}")
    return payload


def hf_greedy(model_dir: str, token_ids: list[int] | tuple[int, ...], max_tokens: int
              ) -> tuple[int, ...]:
    """Greedy continuation by HF transformers, one full forward per token (no cache to trust)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(token_ids)
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return tuple(ids[len(token_ids):])
