"""Worker processes of one kind, started, fed and restarted by the coordinator.

A `WorkerGroup` runs `count` processes of
`python -m <module> --endpoint E --name N --coordinator-pid P [args]`
(the worker side is `workers.base.serve_jobs`) and talks to them over one ROUTER socket.
Runs in the coordinator process, on its loop thread:

- `submit(job) -> Future`: the job goes to the ready worker with the fewest jobs in flight (or
  waits in a queue until one is ready). The future resolves to the worker's `JobDone`.
- `broadcast(make_job) -> [Future]`: one job to every ready worker at once (to drop what the
  workers cached, e.g. an unregistered device's handles); a worker that is not ready yet has
  nothing cached and gets none.
- `on_readable()`: the server calls it when `socket` is readable; it resolves futures.
- `check()`: the server calls it periodically. A worker that exited fails all its in-flight
  jobs with `WORKER_FAILED` (the caller must treat their blocks as not written) and is
  restarted, with a growing delay if it keeps dying.
- `close()`: stops the workers and fails whatever is still in flight.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import msgspec
import zmq

from .. import names
from .. import protocol as p
from .. import runtime
from ..errors import ErrorCode, KvbmError

log = logging.getLogger(__name__)

_decoder = msgspec.msgpack.Decoder(p.WorkerReady | p.JobDone)


class WorkerGroup:
    def __init__(self, kind: str, module: str, count: int, instance_dir: Path, ctx: zmq.Context,
                 args: tuple[str, ...] = ()):
        self.kind = kind
        self._module = module
        self._args = args
        self.endpoint = runtime.endpoint(instance_dir, names.worker_socket(kind))
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.bind(self.endpoint)
        self._procs: dict[str, subprocess.Popen] = {}
        self._ready: set[str] = set()
        self._in_flight: dict[str, dict[int, concurrent.futures.Future]] = {}
        self._queue: collections.deque[tuple[p._Job, concurrent.futures.Future]] = collections.deque()
        self._job_ids = itertools.count(1)
        self._restarts: dict[str, int] = collections.Counter()
        self._restart_at: dict[str, float] = {}
        self.counters: collections.Counter = collections.Counter()
        for i in range(count):
            self._spawn(f"{kind}-{i}")

    def submit(self, job: p._Job) -> concurrent.futures.Future:
        job.job_id = next(self._job_ids)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.append((job, fut))
        self._dispatch()
        return fut

    def broadcast(self, make_job: Callable[[], p._Job]) -> list[concurrent.futures.Future]:
        futures = []
        for name in sorted(self._ready):
            job = make_job()
            job.job_id = next(self._job_ids)
            try:
                self.socket.send_multipart([name.encode(), *p.encode(job)], zmq.NOBLOCK)
            except zmq.ZMQError:  # gone: check() will restart it, with nothing cached
                self._ready.discard(name)
                continue
            fut: concurrent.futures.Future = concurrent.futures.Future()
            self._in_flight[name][job.job_id] = fut
            futures.append(fut)
        return futures

    def on_readable(self) -> None:
        while True:
            try:
                identity, *frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            name = identity.decode(errors="replace")
            try:
                if len(frames) != 2 or frames[0] != p.VERSION_FRAME:
                    raise msgspec.DecodeError("bad frames")
                msg = _decoder.decode(frames[1])
            except msgspec.MsgspecError as e:
                log.error("worker %s sent an undecodable message: %s", name, e)
                continue
            if isinstance(msg, p.WorkerReady):
                self._ready.add(name)
                self._in_flight.setdefault(name, {})
                log.info("%s worker %s ready (pid %d)", self.kind, name, msg.pid)
            else:
                fut = self._in_flight.get(name, {}).pop(msg.job_id, None)
                if fut is not None and not fut.done():
                    self.counters["jobs_ok" if msg.ok else "jobs_failed"] += 1
                    self.counters["bytes"] += msg.nbytes
                    fut.set_result(msg)
        self._dispatch()

    def check(self) -> None:
        now = time.monotonic()
        for name, proc in list(self._procs.items()):
            if proc.poll() is None:
                continue
            del self._procs[name]
            self._ready.discard(name)
            lost = self._in_flight.pop(name, {})
            log.error("%s worker %s (pid %d) exited with %s; %d job(s) failed", self.kind, name, proc.pid,
                      proc.returncode, len(lost))
            self.counters["worker_deaths"] += 1
            for fut in lost.values():
                fut.set_exception(KvbmError(f"{self.kind} worker {name} died during the job", ErrorCode.WORKER_FAILED))
            self._restarts[name] += 1
            self._restart_at[name] = now + min(0.1 * 2 ** (self._restarts[name] - 1), 5.0)
        for name, at in list(self._restart_at.items()):
            if now >= at:
                del self._restart_at[name]
                self._spawn(name)

    def alive(self) -> int:
        return len(self._ready)

    def close(self) -> None:
        for proc in self._procs.values():
            proc.terminate()
        for proc in self._procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for jobs in self._in_flight.values():
            for fut in jobs.values():
                fut.cancel()
        for _, fut in self._queue:
            fut.cancel()
        self.socket.close(0)

    def _spawn(self, name: str) -> None:
        cmd = [sys.executable, "-m", self._module, "--endpoint", self.endpoint, "--name", name,
               "--coordinator-pid", str(os.getpid()), *self._args]
        # a session of its own: Ctrl-C in the coordinator's terminal reaches the coordinator alone,
        # which then stops its workers (a worker also exits when the coordinator is gone)
        self._procs[name] = subprocess.Popen(cmd, start_new_session=True)

    def _dispatch(self) -> None:
        while self._queue and self._ready:
            name = min(self._ready, key=lambda n: len(self._in_flight[n]))
            job, fut = self._queue.popleft()
            if fut.cancelled():
                continue
            try:
                self.socket.send_multipart([name.encode(), *p.encode(job)], zmq.NOBLOCK)
            except zmq.ZMQError:  # gone between ready and now: check() will restart it
                self._ready.discard(name)
                self._queue.appendleft((job, fut))
                continue
            self._in_flight[name][job.job_id] = fut
