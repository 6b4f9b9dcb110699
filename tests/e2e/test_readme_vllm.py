"""The README's vLLM quick start, run as it stands: the code blocks of its section "Two vLLM engines
sharing one cache" are taken from README.md, and only the values a test machine needs are
substituted (the locally built tiny model for the model name, free ports, small cache sizes),
each of which must still be found in the README. Then: `kvbm-shm serve` and two `vllm serve`
OpenAI servers as the shell block starts them, the README's client script against both, and
the answers checked (the same text, `cached_tokens` 0 then the shared prefix, the hit served
by the service). The README cannot drift from what works.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from kvbm_shm.client import Client
from kvbm_shm.shm import list_segments
from tests.procs import free_port

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Two vLLM engines sharing one cache"
BLOCK = 128  # vLLM's block size on CPU
README_MODEL = "meta-llama/Llama-3.2-1B-Instruct"


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block in the README's vLLM section."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end >= 0 else len(text)]
    return re.findall(r"^```(\w*)\n(.*?)^```$", section, flags=re.S | re.M)


def substitute(code: str, values: dict[str, str]) -> str:
    for old, new in values.items():
        code = code.replace(old, new)
    return code


def wait_until_serving(port: int, servers: subprocess.Popen, log: Path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if servers.poll() is not None:  # the shell waits for the first of its jobs to end
            pytest.fail(f"a process the README's commands started exited ({servers.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"no vLLM server on port {port} within {timeout_s} s:\n{log.read_text()[-4000:]}")


def stop_group(shell: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM to every process the README's commands started (their own process group), and
    wait until all are gone (the service unlinks its pools on the way out); SIGKILL after
    `timeout_s`."""
    os.killpg(shell.pid, signal.SIGTERM)
    shell.wait(timeout_s)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            os.killpg(shell.pid, 0)
            time.sleep(0.2)
        os.killpg(shell.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_readme_vllm_commands_run_verbatim(tiny_model_dir, tmp_path):
    blocks = readme_blocks()
    assert [lang for lang, _ in blocks] == ["sh", "sh", "python"], "the README's vLLM section changed shape"
    (_, install), (_, servers), (_, client) = blocks
    assert install.startswith("python -m pip install --no-deps ")
    ports = free_port(), free_port()
    values = {README_MODEL: tiny_model_dir, "--cpu-cache-gb 16": "--cpu-cache-gb 0.25",
              "--kv-cache-memory-bytes 4G": "--kv-cache-memory-bytes 64M", "8001": str(ports[0]),
              "8002": str(ports[1])}
    for old in values:
        assert old in servers or old in client, f"{old!r} is no longer in the README's vLLM commands"

    instance = f"t{uuid.uuid4().hex[:10]}"
    runtime_dir = Path(tempfile.mkdtemp(prefix="kv", dir="/tmp"))
    env = {**os.environ, "KVBM_INSTANCE": instance, "KVBM_RUNTIME_DIR": str(runtime_dir),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_LOGGING_LEVEL": "WARNING"}
    log = tmp_path / "servers.log"
    with open(log, "wb") as out:
        shell = subprocess.Popen(["bash", "-c", substitute(servers, values) + "\nwait -n\n"], env=env, cwd=tmp_path,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for port in ports:
            wait_until_serving(port, shell, log)
        answer = subprocess.run([sys.executable, "-c", substitute(client, values)], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert answer.returncode == 0, answer.stderr
        first, second = (ast.literal_eval(line) for line in answer.stdout.splitlines())
        with Client(instance=instance, runtime_dir=runtime_dir, timeout_s=10) as service:
            (pool,) = service.stats().pools
    finally:
        stop_group(shell)
        left = list_segments(f"kvbm-{instance}-")
        shutil.rmtree(runtime_dir, ignore_errors=True)

    assert first[1] == 0
    assert second[1] >= 2 * BLOCK and second[1] % BLOCK == 0
    assert second[0] == first[0]
    assert pool.counters["hit_blocks"] >= second[1] // BLOCK  # the hit came from the service
    assert not left, f"segments left in /dev/shm: {left}"
