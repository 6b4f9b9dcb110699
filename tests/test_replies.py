"""The reply matcher (`kvbm_shm.replies`) against a ROUTER peer that answers as a test scripts it:
late replies of timed-out requests are dropped, the deadline holds whatever arrives meanwhile,
a reply of the wrong kind or an error reply is refused with its type, and the error of a call
that got nothing says TIMEOUT or UNAVAILABLE as the coordinator's pid says."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import pytest
import zmq
import zmq.asyncio

from kvbm_shm import protocol as p
from kvbm_shm.errors import CoordinatorUnavailable, ErrorCode, ProtocolError, RequestError
from kvbm_shm.replies import AsyncReplies, Peer, Replies

TIMEOUT_S = 0.3
SLACK_S = 0.25  # a loaded 2-core machine


def stats_reply(req: int) -> p.StatsReply:
    return p.StatsReply(req=req, instance="t", instance_id="i", pid=1, uptime_s=0.0, cpu_cache_bytes=0,
                        cpu_used_bytes=0, pools=[], clients=[], counters={})


class Peer_:
    """A ROUTER that, for each request, sends what `script(request)` returns (a list of replies,
    with an optional delay in seconds before each) back to its sender."""

    def __init__(self, endpoint: str, script):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.script = script
        self.received: list[p._Request] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            identity, *frames = self.sock.recv_multipart()
            request = p.decode_request(frames)
            self.received.append(request)
            for delay_s, reply in self.script(request):
                time.sleep(delay_s)
                self.sock.send_multipart([identity, *p.encode(reply)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def endpoint(tmp_path):
    return f"ipc://{tmp_path}/control.sock"


@pytest.fixture
def dealer(endpoint):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    yield sock
    sock.close(0)
    ctx.term()


def timed(call) -> tuple[BaseException | object, float]:
    start = time.monotonic()
    try:
        result = call()
    except Exception as e:
        result = e
    return result, time.monotonic() - start


def test_late_replies_of_timed_out_requests_are_dropped(endpoint, dealer):
    late: list[int] = []

    def script(request):
        if not late:  # the first request: no answer in time
            late.append(request.req)
            return []
        return [(0, stats_reply(late[0])), (0, p.OkReply(req=late[0])), (0, stats_reply(request.req))]

    peer = Peer_(endpoint, script)
    try:
        replies = Replies(dealer, Peer(endpoint))
        error, _ = timed(lambda: replies.call(p.Stats(req=0), TIMEOUT_S))
        assert isinstance(error, CoordinatorUnavailable) and error.code == ErrorCode.TIMEOUT
        second = p.Stats(req=0)
        reply = replies.call(second, TIMEOUT_S)
        assert (reply.req, second.req, late) == (2, 2, [1])
        assert replies.stale_replies == 2 and [r.req for r in peer.received] == [1, 2]
    finally:
        peer.close()


def test_the_deadline_holds_while_stale_replies_keep_coming(endpoint, dealer):
    peer = Peer_(endpoint, lambda request: [(0.05, p.OkReply(req=request.req + 100)) for _ in range(40)])
    try:
        replies = Replies(dealer, Peer(endpoint))
        error, elapsed = timed(lambda: replies.call(p.Stats(req=0), 1.0))  # a stale reply every 50 ms
        assert isinstance(error, CoordinatorUnavailable) and error.code == ErrorCode.TIMEOUT
        assert 1.0 <= elapsed < 1.0 + SLACK_S and replies.stale_replies >= 5
    finally:
        peer.close()


def test_a_reply_of_the_wrong_kind_or_an_error_is_refused(endpoint, dealer):
    answers = iter([p.OkReply(req=0), p.ErrorReply(req=0, code=int(ErrorCode.UNKNOWN_POOL), message="no pool 9")])
    peer = Peer_(endpoint, lambda request: [(0, type(a)(**{**{f: getattr(a, f) for f in a.__struct_fields__},
                                                            "req": request.req})) for a in [next(answers)]])
    try:
        replies = Replies(dealer, Peer(endpoint))
        with pytest.raises(ProtocolError, match="Stats got a OkReply") as wrong:
            replies.call(p.Stats(req=0), TIMEOUT_S)
        assert wrong.value.code == ErrorCode.BAD_FRAME
        with pytest.raises(RequestError, match="no pool 9") as refused:
            replies.call(p.Stats(req=0), TIMEOUT_S)
        assert refused.value.code == ErrorCode.UNKNOWN_POOL
    finally:
        peer.close()


def test_no_coordinator_connected_is_unavailable_within_the_deadline(endpoint, dealer):
    replies = Replies(dealer, Peer(endpoint))
    error, elapsed = timed(lambda: replies.call(p.Stats(req=0), TIMEOUT_S))
    assert isinstance(error, CoordinatorUnavailable) and error.code == ErrorCode.UNAVAILABLE
    assert f"no coordinator is listening at {endpoint}" in str(error) and elapsed < TIMEOUT_S + SLACK_S


def test_no_reply_from_a_coordinator_whose_process_is_gone_is_unavailable(endpoint, dealer):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    peer = Peer_(endpoint, lambda request: [])
    try:
        replies = Replies(dealer, Peer(endpoint, coordinator_pid=gone.pid))
        error, _ = timed(lambda: replies.call(p.Stats(req=0), TIMEOUT_S))
        assert error.code == ErrorCode.UNAVAILABLE and f"pid {gone.pid}, is gone" in str(error)
        replies.peer.coordinator_pid = os.getpid()  # alive: only slow
        error, _ = timed(lambda: replies.call(p.Stats(req=0), TIMEOUT_S))
        assert error.code == ErrorCode.TIMEOUT
    finally:
        peer.close()


def test_a_request_over_the_frame_limit_is_not_sent(endpoint, dealer):
    peer = Peer_(endpoint, lambda request: [(0, stats_reply(request.req))])
    try:
        replies = Replies(dealer, Peer(endpoint, max_frame_bytes=4096))
        big = p.Lookup(req=0, lease=b"\0" * 16, pool_id=0, hashes=[b"\1" * 16] * 300)
        with pytest.raises(ProtocolError, match="exceeds the coordinator's max_frame_bytes 4096") as e:
            replies.call(big, TIMEOUT_S)
        assert e.value.code == ErrorCode.FRAME_TOO_LARGE
        assert replies.call(p.Stats(req=0), TIMEOUT_S).req == 2 and [r.req for r in peer.received] == [2]
    finally:
        peer.close()


def test_the_async_form_drops_late_replies_and_keeps_its_deadline(endpoint):
    late: list[int] = []

    def script(request):
        if not late:
            late.append(request.req)
            return []
        return [(0, stats_reply(late[0])), (0, stats_reply(request.req))]

    peer = Peer_(endpoint, script)

    async def run():
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        try:
            replies = AsyncReplies(sock, Peer(endpoint))
            start = time.monotonic()
            with pytest.raises(CoordinatorUnavailable) as e:
                await replies.call(p.Stats(req=0), TIMEOUT_S)
            elapsed = time.monotonic() - start
            reply = await replies.call(p.Stats(req=0), TIMEOUT_S)
            return e.value.code, elapsed, reply.req, replies.stale_replies
        finally:
            sock.close(0)
            ctx.term()

    try:
        code, elapsed, req, stale = asyncio.run(run())
        assert (code, req, stale) == (ErrorCode.TIMEOUT, 2, 1) and TIMEOUT_S <= elapsed < TIMEOUT_S + SLACK_S
    finally:
        peer.close()
