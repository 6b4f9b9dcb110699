"""An engine's link to the coordinator that never makes the engine wait for a service that is down.

Runs in an engine process (inside an inference engine's connector). The engine must keep serving
when the service is not running, and pick the service up again when it comes back, without ever
blocking on it for longer than one request's deadline.

Primitives:
- `ServiceLink(config, name, on_connect)`: owns one `Client`. The constructor tries once (so a
  running service is in use from the engine's first request; a missing one costs at most one
  deadline), then a background thread reconnects with backoff whenever the link is down. On each
  connect it runs `on_connect(client)` (register pools, bind tensors) and keeps what it returns
  as the link's state. Only then is the link up.
- `call(fn)`: `fn(client, state)` while the link is up; `None` at once while it is down. A call
  that finds no coordinator (`CoordinatorUnavailable`, code UNAVAILABLE) marks the link down and
  wakes the reconnect thread. A call that timed out (code TIMEOUT: the coordinator took the
  request but was slow, e.g. staging from disk) gives `None` and leaves the link up; only
  `MAX_TIMEOUTS_IN_A_ROW` timeouts without a call that succeeded in between (a hung coordinator)
  mark it down. A refused request (`KvbmError`) is logged and gives `None`. So a caller never
  waits longer than one deadline (`ClientConfig.timeout_s`) in total for a dead service, nor
  longer than `MAX_TIMEOUTS_IN_A_ROW` deadlines for a hung one, and not at all afterwards.
- A runtime directory, segment or coordinator that is not ours to trust (`ForeignError`) keeps the
  link down and is logged as an error at every try (at most every `max_retry_s`), not hidden.
- `on_connect` raising `ValueError` (the engine's tensors do not fit the namespace) disables the
  link for good: it is logged once and every `call` gives `None`.
- `close()`: stops the thread and closes the client (its lease ends, pins drop).

A coordinator restart is handled by the client library (hello again, pools re-registered); the
link only has to notice unavailability and try again.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, TypeVar

from ..client import Client
from ..config import ClientConfig
from ..errors import CoordinatorUnavailable, ErrorCode, ForeignError, KvbmError

log = logging.getLogger(__name__)

MAX_TIMEOUTS_IN_A_ROW = 3

R = TypeVar("R")


class ServiceLink:
    def __init__(self, config: ClientConfig, name: str, on_connect: Callable[[Client], Any],
                 retry_s: float = 0.5, max_retry_s: float = 5.0):
        self.config = config
        self.name = name
        self._on_connect = on_connect
        self._retry_s = retry_s
        self._max_retry_s = max_retry_s
        self._client: Client | None = None
        self._state: Any = None
        self._up = threading.Event()
        self._wake = threading.Event()
        self._closed = False
        self._disabled = False
        self._timeouts = 0  # calls in a row that timed out
        if self._connect():
            log.info("kvbm-shm service connected (%s)", name)
        self._thread = threading.Thread(target=self._run, name=f"kvbm-link-{name}", daemon=True)
        self._thread.start()

    @property
    def up(self) -> bool:
        return self._up.is_set()

    def wait_up(self, timeout_s: float) -> bool:
        """Block until the link is up (tests and tools; an engine never calls this)."""
        return self._up.wait(timeout_s)

    def call(self, fn: Callable[[Client, Any], R]) -> R | None:
        if not self._up.is_set():
            return None
        try:
            result = fn(self._client, self._state)
            self._timeouts = 0
            return result
        except CoordinatorUnavailable as e:
            if e.code == ErrorCode.TIMEOUT and self._timeouts + 1 < MAX_TIMEOUTS_IN_A_ROW:
                self._timeouts += 1
                log.warning("kvbm-shm request timed out (%s): skipped, the service stays in use", e)
                return None
            if self._up.is_set():
                log.warning("kvbm-shm service unavailable (%s): continuing without it", e)
            self._mark_down()
        except KvbmError as e:
            log.warning("kvbm-shm request refused: %s", e)
        return None

    def close(self) -> None:
        self._closed = True
        self._up.clear()
        self._wake.set()
        self._thread.join(timeout=self.config.timeout_s + 1)
        if self._client is not None:
            self._client.close()
            self._client = None

    # ------------------------------------------------------------ reconnect thread

    def _mark_down(self) -> None:
        self._timeouts = 0
        self._up.clear()
        self._wake.set()

    def _run(self) -> None:
        delay = self._retry_s
        while not self._closed and not self._disabled:
            if self._up.is_set():
                self._wake.wait()
                self._wake.clear()
                delay = self._retry_s
            elif self._connect():
                log.info("kvbm-shm service connected (%s)", self.name)
            elif not self._disabled:
                self._wake.wait(delay)
                self._wake.clear()
                delay = min(delay * 2, self._max_retry_s)

    def _connect(self) -> bool:
        try:
            if self._client is None:
                self._client = Client(self.config, name=self.name)
            # on_connect's first request is the probe; a lost lease (restarted coordinator)
            # makes the client say hello again and re-register its pools there.
            self._state = self._on_connect(self._client)
        except ForeignError as e:
            log.error("kvbm-shm service refused, not trusted: %s", e)
            return False
        except KvbmError as e:
            log.debug("kvbm-shm service not reachable yet: %s", e)
            return False
        except ValueError as e:
            log.error("kvbm-shm disabled for this engine: %s", e)
            self._disabled = True
            return False
        if self._closed:
            return False
        self._up.set()
        return True
