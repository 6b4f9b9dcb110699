"""The worker side of the job protocol: connect, announce, run jobs one by one, answer each.

`serve_jobs(endpoint, name, job_type, handle, coordinator_pid)` connects a DEALER (identity
`name`) to the coordinator's worker socket, sends `WorkerReady`, then for each job calls
`handle(job)` and sends back its `JobDone`. An exception in `handle` becomes
`JobDone(ok=False, error=...)`: the worker keeps serving. The loop ends on SIGTERM or as soon as
its parent is no longer `coordinator_pid` (the coordinator died, even before the worker got
this far: the pid comes on the command line, not from `getppid()` at start-up), or when a
send has waited a second for a coordinator that is gone (a DEALER without a peer blocks forever).
`worker_main` is the common command line: `--endpoint E --name N --coordinator-pid P` plus
extra options.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from typing import Callable

import msgspec
import zmq

from .. import protocol as p

log = logging.getLogger(__name__)


def serve_jobs(endpoint: str, name: str, job_type, handle: Callable[[p._Job], p.JobDone],
               coordinator_pid: int) -> None:
    decoder = msgspec.msgpack.Decoder(job_type)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    if os.getppid() != coordinator_pid:
        log.warning("worker %s: coordinator %d is gone before the worker started; exiting", name, coordinator_pid)
        return
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, name.encode())
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.SNDTIMEO, 1000)  # a DEALER whose peer died would block in send forever
    sock.connect(endpoint)
    try:
        sock.send_multipart(p.encode(p.WorkerReady(name=name, pid=os.getpid())))
        while not stop and os.getppid() == coordinator_pid:
            if not sock.poll(200):
                continue
            frames = sock.recv_multipart()
            try:
                job = decoder.decode(frames[1])
            except (msgspec.MsgspecError, IndexError) as e:
                log.error("worker %s: undecodable job: %s", name, e)
                continue
            try:
                done = handle(job)
            except Exception as e:
                log.exception("worker %s: job %d failed", name, job.job_id)
                done = p.JobDone(job_id=job.job_id, ok=False, error=f"{type(e).__name__}: {e}")
            sock.send_multipart(p.encode(done))
    except zmq.Again:
        log.warning("worker %s: the coordinator is gone (a send timed out)", name)
    finally:
        sock.close()
        ctx.term()


def worker_main(description: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
                ) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--coordinator-pid", type=int, required=True)
    parser.add_argument("--log-level", default=os.environ.get("KVBM_LOG_LEVEL", "INFO"))
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s {args.name}: %(message)s")
    return args
