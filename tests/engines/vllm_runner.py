"""Run a real vLLM engine (CPU) on a local model in its own process, for tests and benchmarks.

The test (or benchmark) process drives an engine that lives in a child started with
multiprocessing ``spawn``: every ``EngineProcess`` is a new engine process with its own
environment (the end-to-end tests need engine A and engine B to be different processes), and the
parent can act between two ``generate`` calls (kill the service, corrupt a block). Nothing here
imports kvbm_shm; a connector under test is named through ``EngineSpec.kv_transfer_config``.

Primitives:
  - ``Prompt(token_ids, cache_salt=None, lora=None)``: one request, given as token ids so tests
    place block boundaries exactly; ``lora`` is ``(name, int_id, adapter_dir)`` of a LoRA adapter.
  - ``EngineSpec``: what engine to start: model directory, KV transfer config (a plain dict, as
    ``LLM(kv_transfer_config=...)`` takes it), vLLM's own prefix caching on or off, LoRA on or
    off, extra environment variables for the child.
  - ``EngineProcess(spec, timeout_s)``: a context manager. Entering starts the child and waits
    until the engine is up (``start_s``: the ``LLM(...)`` construction); ``generate(prompts,
    max_tokens)`` serves one batch with one greedy ``LLM.generate`` call and returns an
    ``EngineResult`` (generated token ids and ``num_cached_tokens`` per request, wall time of the
    call); leaving stops the child. A child failure is re-raised in the parent with the child's
    traceback; a child that gives no answer within ``timeout_s`` is killed and reported.
  - ``hf_greedy(model_dir, token_ids, max_tokens)``: the reference, HF transformers' greedy
    continuation on the same model, in this process.

Engine settings fixed here (what vLLM CPU needs on small machines): float32, ``enforce_eager``, in-process engine core
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: start in seconds instead of tens of seconds), a KV cache
of ``VLLM_CPU_KVCACHE_SPACE=1`` GiB. The scheduler-side and worker-side connector instances then
share the engine process.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
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
    lora: tuple[str, int, str] | None = None


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    model_dir: str
    kv_transfer_config: dict[str, Any] | None = None
    enable_prefix_caching: bool = True
    max_model_len: int = 4096
    enable_lora: bool = False
    env: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RequestResult:
    token_ids: tuple[int, ...]
    num_cached_tokens: int


@dataclasses.dataclass(frozen=True)
class EngineResult:
    requests: tuple[RequestResult, ...]
    generate_s: float


class EngineProcessError(RuntimeError):
    """The engine child failed (the message carries its traceback) or stopped answering."""


def _engine_main(spec: EngineSpec, conn) -> None:
    """Child process: start the engine, then serve ("generate", prompts, max_tokens) commands."""
    try:
        os.dup2(2, 1)  # vLLM logs to stdout: keep the parent's stdout (a benchmark's JSON) clean
        os.environ.update(ENGINE_ENV)
        os.environ.update(spec.env)
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        t0 = time.perf_counter()
        llm = LLM(
            model=spec.model_dir,
            dtype="float32",
            enforce_eager=True,
            max_model_len=spec.max_model_len,
            enable_prefix_caching=spec.enable_prefix_caching,
            kv_transfer_config=spec.kv_transfer_config,
            seed=0,
            **({"enable_lora": True, "max_lora_rank": 8, "max_loras": 2} if spec.enable_lora else {}),
        )
        conn.send(("ok", time.perf_counter() - t0))
        while True:
            command = conn.recv()
            if command[0] == "stop":
                break
            _, prompts, max_tokens = command
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            inputs = []
            for p in prompts:
                prompt = {"prompt_token_ids": list(p.token_ids)}
                if p.cache_salt is not None:
                    prompt["cache_salt"] = p.cache_salt
                inputs.append(prompt)
            loras = [None if p.lora is None else LoRARequest(*p.lora) for p in prompts]
            t0 = time.perf_counter()
            outputs = llm.generate(inputs, params, use_tqdm=False, lora_request=loras if any(loras) else None)
            elapsed = time.perf_counter() - t0
            conn.send(("ok", EngineResult(
                tuple(RequestResult(tuple(o.outputs[0].token_ids), int(o.num_cached_tokens or 0))
                      for o in outputs), elapsed)))
    except BaseException:  # the process boundary: report everything to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class EngineProcess:
    """One vLLM engine in a spawned child; see the module docstring."""

    def __init__(self, spec: EngineSpec, timeout_s: float = 300.0):
        self.spec = spec
        self.timeout_s = timeout_s
        self.start_s = 0.0
        self._conn = None
        self._child = None

    @property
    def pid(self) -> int:
        return self._child.pid

    def __enter__(self) -> "EngineProcess":
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._child = ctx.Process(target=_engine_main, args=(self.spec, child_conn),
                                  name="vllm-engine", daemon=True)
        self._child.start()
        child_conn.close()
        try:
            self.start_s = self._answer()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def generate(self, prompts: list[Prompt], max_tokens: int = 8) -> EngineResult:
        self._conn.send(("generate", list(prompts), max_tokens))
        return self._answer()

    def _answer(self):
        if not self._conn.poll(self.timeout_s):
            raise EngineProcessError(f"engine process {self.pid} gave no answer in {self.timeout_s} s")
        try:
            status, payload = self._conn.recv()
        except EOFError:
            self._child.join(5)
            raise EngineProcessError(
                f"engine process {self.pid} died with exit code {self._child.exitcode}") from None
        if status != "ok":
            raise EngineProcessError(f"engine process {self.pid} failed:\n{payload}")
        return payload

    def _stop(self) -> None:
        try:
            self._conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        self._child.join(30)
        if self._child.is_alive():
            self._child.kill()
            self._child.join(10)
        self._conn.close()


def hf_greedy(model_dir: str, token_ids, max_tokens: int) -> tuple[int, ...]:
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
