"""Multiprocess test helpers: run functions in spawned children, with timeouts, and start real
coordinator processes.

`run_child(fn, *args, timeout_s=...)` runs a module-level function in a `spawn` child and returns
its result; a child failure is re-raised here with the child's traceback, and a child that
outlives its timeout is killed and reported. `start_child` does the same without waiting.
`CoordinatorProcess` runs `python -m kvbm_shm serve` and knows how to find, stop and kill it;
`preexec` (a module-level function run in the child before exec) sets up what it runs under,
e.g. resource limits.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from kvbm_shm import names, runtime
from kvbm_shm.shm import list_segments, unlink

_ctx = mp.get_context("spawn")


class ChildFailed(AssertionError):
    pass


def _child_main(conn, fn, args, kwargs):
    try:
        conn.send(("ok", fn(*args, **kwargs)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class Child:
    def __init__(self, fn, args, kwargs, timeout_s: float):
        self._recv, send = _ctx.Pipe(duplex=False)
        self.process = _ctx.Process(target=_child_main, args=(send, fn, args, kwargs), daemon=True)
        self.process.start()
        send.close()
        self.timeout_s = timeout_s
        self.name = getattr(fn, "__name__", str(fn))

    @property
    def pid(self) -> int:
        return self.process.pid

    def result(self):
        if not self._recv.poll(self.timeout_s):
            self.kill()
            raise ChildFailed(f"child {self.name} did not finish within {self.timeout_s} s")
        try:
            status, value = self._recv.recv()
        except EOFError:
            self.process.join(5)
            raise ChildFailed(f"child {self.name} died with exit code {self.process.exitcode}") from None
        self.process.join(10)
        if status == "error":
            raise ChildFailed(f"child {self.name} failed:\n{value}")
        return value

    def kill(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)


def start_child(fn, *args, timeout_s: float = 60, **kwargs) -> Child:
    return Child(fn, args, kwargs, timeout_s)


def run_child(fn, *args, timeout_s: float = 60, **kwargs):
    return start_child(fn, *args, timeout_s=timeout_s, **kwargs).result()


class CoordinatorProcess:
    """A real `kvbm-shm serve` process for one test instance."""

    def __init__(self, instance: str, runtime_dir: Path, *extra: str, cpu_cache_gb: float = 0.0625,
                 lease_ms: int = 1000, env: dict | None = None,
                 preexec: Callable[[], None] | None = None):
        self.instance = instance
        self.runtime_dir = Path(runtime_dir)
        self.args = [sys.executable, "-m", "kvbm_shm", "serve", "--instance", instance,
                     "--runtime-dir", str(runtime_dir), "--cpu-cache-gb", str(cpu_cache_gb),
                     "--lease-ms", str(lease_ms), "--log-level", "INFO", *extra]
        self.env = {**os.environ, **(env or {})}
        self.log_path = self.runtime_dir / f"{instance}.log"
        self.preexec = preexec
        self.proc: subprocess.Popen | None = None

    @property
    def instance_dir(self) -> Path:
        return self.runtime_dir / self.instance

    def start(self, timeout_s: float = 30) -> "CoordinatorProcess":
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     preexec_fn=self.preexec)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = runtime.read_info(self.instance_dir) if self.instance_dir.exists() else None
            if info is not None and info.pid == self.proc.pid:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"coordinator did not start within {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def stop(self, timeout_s: float = 20) -> int:
        """SIGTERM and wait: the clean shutdown path."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"coordinator ignored SIGTERM for {timeout_s} s:\n{self.log()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def segments(self) -> list[str]:
        return list_segments(names.instance_prefix(self.instance))

    def remove_leftovers(self) -> list[str]:
        """Unlink what a killed coordinator left (tests that kill it on purpose)."""
        left = self.segments()
        for name in left:
            unlink(name)
        return left


def wait_for(condition, timeout_s: float = 10.0, what: str = "condition"):
    """The first truthy value of `condition()`; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never held within {timeout_s} s")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
