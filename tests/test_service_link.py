"""ServiceLink: an engine never waits for a service that is down, and finds it again when it is back."""

from __future__ import annotations

import time

from kvbm_shm.config import ClientConfig
from kvbm_shm.integrations.service_link import ServiceLink

TIMEOUT_S = 0.3


def stats(client, state):
    return client.stats()


def make_link(instance, runtime_dir, connects: list, on_connect=None) -> ServiceLink:
    def default_on_connect(client):
        connects.append(client.client_id)
        return len(connects)

    config = ClientConfig(instance=instance, runtime_dir=runtime_dir, timeout_s=TIMEOUT_S)
    return ServiceLink(config, "test", on_connect or default_on_connect, retry_s=0.05, max_retry_s=0.2)


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def test_missing_service_costs_one_deadline_then_nothing(instance, runtime_dir, coordinator_factory):
    connects: list[int] = []
    link, elapsed = timed(lambda: make_link(instance, runtime_dir, connects))
    try:
        assert elapsed < TIMEOUT_S + 0.5  # the constructor tried once
        assert not link.up
        result, elapsed = timed(lambda: link.call(stats))
        assert result is None and elapsed < 0.01

        coordinator_factory()
        assert link.wait_up(10)
        assert link.call(lambda client, state: state) == 1
        assert link.call(stats).pools == []
    finally:
        link.close()


def test_killed_service_is_noticed_once_and_found_again(instance, runtime_dir, coordinator_factory):
    coordinator = coordinator_factory()
    connects: list[int] = []
    link = make_link(instance, runtime_dir, connects)
    try:
        assert link.up and len(connects) == 1
        coordinator.kill()
        result, elapsed = timed(lambda: link.call(stats))
        assert result is None and elapsed < TIMEOUT_S + 0.2  # one deadline
        assert not link.up
        result, elapsed = timed(lambda: link.call(stats))
        assert result is None and elapsed < 0.01  # then nothing

        again = coordinator_factory()
        assert link.wait_up(10)
        assert len(connects) >= 2  # on_connect ran again for the new coordinator
        assert link.call(stats).pid == again.proc.pid
    finally:
        link.close()


def test_on_connect_value_error_disables_the_link(instance, runtime_dir, coordinator):
    def refuse(client):
        raise ValueError("tensors do not match the namespace")

    link = make_link(instance, runtime_dir, [], on_connect=refuse)
    try:
        assert not link.wait_up(0.5)
        assert link.call(stats) is None
    finally:
        link.close()
