"""Tests that need an inference engine's environment (`.venv-vllm`: vLLM, transformers); each
module skips cleanly elsewhere. Shared fixture: the locally built tiny Llama, once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tests.engines.tiny_llama import build_model_dir

    return str(build_model_dir(tmp_path_factory.mktemp("tiny-llama"), size="tiny", seed=0))
