"""Shared fixtures: a unique instance per test, real coordinator processes, the rule that a test
leaves nothing in /dev/shm, and the locally built tiny Llama of the engine tests (once per session,
where transformers is installed: `.venv-vllm`)."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from kvbm_shm.names import instance_prefix
from kvbm_shm.shm import list_segments

from .procs import CoordinatorProcess


@pytest.fixture
def instance() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def runtime_dir():
    # short path: ipc:// socket paths are limited to ~107 bytes
    path = Path(tempfile.mkdtemp(prefix="kv", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def coordinator_factory(instance, runtime_dir):
    """Start coordinators for this test's instance; all are stopped and checked at teardown."""
    started: list[CoordinatorProcess] = []

    def start(*extra: str, **kwargs) -> CoordinatorProcess:
        coord = CoordinatorProcess(instance, runtime_dir, *extra, **kwargs).start()
        started.append(coord)
        return coord

    yield start
    for coord in started:
        coord.stop()
    left = list_segments(instance_prefix(instance))
    for coord in started[-1:]:
        coord.remove_leftovers()
    assert not left, f"segments left in /dev/shm after the test: {left}"


@pytest.fixture
def coordinator(coordinator_factory) -> CoordinatorProcess:
    return coordinator_factory()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tests.engines.tiny_llama import build_model_dir

    return str(build_model_dir(tmp_path_factory.mktemp("tiny-llama"), size="tiny", seed=0))
