"""`serve --metrics-port`: /metrics scraped over HTTP tells the pool contents, and its counters move
with stores, loads, lookups, refused requests and every tier's transfers exactly as much as they should."""

from __future__ import annotations

import socket
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvbm_shm import protocol as p
from kvbm_shm.client import Client
from kvbm_shm.control.metrics import Metrics
from kvbm_shm.device.client import DeviceKv
from kvbm_shm.device.standin import StandInKv
from kvbm_shm.errors import ConfigError, RequestError
from kvbm_shm.layout import EngineLayout, KvLayout, Namespace, TensorSpec
from kvbm_shm.shm import PoolSegment, list_segments

from .kv_contents import BLOCK_BYTES, PAGE, Contents
from .procs import CoordinatorProcess, free_port, wait_for



class Scrape:
    def __init__(self, port: int):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        self.samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                        for family in text_string_to_metric_families(text) for s in family.samples}

    def __call__(self, name: str, **labels) -> float:
        return self.samples[name, tuple(sorted(labels.items()))]


POOL = {"pool": "0", "model": "obs-test"}
STORE, LOAD = {"path": "g1_to_g2"}, {"path": "g2_to_g1"}


def test_metrics_scrape_and_counters_move(coordinator_factory, instance, runtime_dir):
    port = free_port()
    coordinator_factory("--metrics-port", str(port))
    with Client(instance=instance, runtime_dir=runtime_dir, name="w") as client, \
            Client(instance=instance, runtime_dir=runtime_dir, name="r"):
        contents = Contents.fill(client)  # one store of 8 blocks
        m = Scrape(port)
        num_blocks = contents.pool.num_blocks
        assert m("kvbm_clients") == 2
        assert m("kvbm_coordinator_info", instance=instance, instance_id=client.instance_id, version="0.1.0") == 1
        assert m("kvbm_blocks", **POOL, tier="g2", state="registered") == 8
        assert m("kvbm_blocks", **POOL, tier="g2", state="free") == num_blocks - 8
        assert m("kvbm_pinned_blocks", **POOL, tier="g2") == 0
        assert m("kvbm_block_bytes", **POOL) == BLOCK_BYTES
        assert m("kvbm_stored_blocks_total", **POOL) == 8
        assert m("kvbm_hit_blocks_total", **POOL, tier="g2") == 0
        assert m("kvbm_transfer_bytes_total", **STORE) == 8 * BLOCK_BYTES
        assert m("kvbm_transfer_seconds_count", **STORE) == 1
        assert m("kvbm_transfer_bytes_total", **LOAD) == 0
        assert m("kvbm_request_seconds_count", op="commit") == 1
        requests = m("kvbm_requests_total")

        assert client.load(contents.kv, contents.hashes[:4], [20, 21, 22, 23]).loaded == 4  # no pins: no window
        client.release(contents.pool, client.lookup(contents.pool, contents.hashes[:4], pin=True))  # a pinned load
        assert len(client.lookup(contents.pool, contents.hashes)) == 8
        with pytest.raises(RequestError, match="holds no pin"):
            client.release(contents.pool, [0])
        wait_for(lambda: Scrape(port)("kvbm_lookups_total", **POOL) == 3, what="the usage report of local lookups")
        m = Scrape(port)
        assert m("kvbm_lookups_total", **POOL) == 3
        assert m("kvbm_lookup_blocks_total", **POOL) == 4 + 4 + 12
        assert m("kvbm_hit_blocks_total", **POOL, tier="g2") == 4 + 4 + 8
        assert m("kvbm_hit_tokens_total", **POOL, tier="g2") == (4 + 4 + 8) * PAGE
        assert m("kvbm_transfer_bytes_total", **LOAD) == 4 * BLOCK_BYTES
        assert m("kvbm_transfer_seconds_count", **LOAD) == 1
        assert m("kvbm_transfer_bytes_total", **STORE) == 8 * BLOCK_BYTES
        assert m("kvbm_errors_total", code="not_pinned") == 1
        assert m("kvbm_request_seconds_count", op="lookup") == 1  # the pinned one: the others asked nobody
        assert m("kvbm_requests_total") >= requests + 4  # pinned lookup, release, bad release, usage report
        assert m("kvbm_process_resident_memory_bytes") > 0


def test_metrics_port_in_use_fails_at_start(instance, runtime_dir):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        coordinator = CoordinatorProcess(instance, runtime_dir, "--metrics-port", str(taken.getsockname()[1]))
        with pytest.raises(RuntimeError, match="cannot serve metrics on port .*in use"):
            coordinator.start()
    assert "Traceback" not in coordinator.log()
    assert not list_segments(f"kvbm-{instance}-") and not (runtime_dir / instance / "runtime.json").exists()


def test_metrics_without_prometheus_client_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if the tools extra were not installed
    with pytest.raises(ConfigError, match=r"pip install 'kvbm-shm\[tools\]'"):
        Metrics.start(coordinator=None, port=free_port())


def test_every_tier_transfer_path_is_counted(coordinator_factory, instance, runtime_dir):
    """Tiers report their finished transfers to the sink metrics listens to: a worker-driven offload
    (g1_to_g2) written through to disk (g2_to_g3), evicted from G2 and staged back by a lookup
    (g3_to_g2), then onboarded (g2_to_g1), each path with exactly the bytes it moved."""
    port = free_port()
    disk_dir = runtime_dir / "disk"
    disk_dir.mkdir()
    coordinator_factory("--metrics-port", str(port), "--disk-cache-gb", "0.004", "--disk-dir", str(disk_dir),
                        "--disk-write-through", "--transfer-workers", "1")
    spec = TensorSpec((2, 16, 64), 0, "float32")  # 2 layers, 2 heads, 16 tokens, head dim 32: 16 KiB blocks
    ns = Namespace("paths-test", KvLayout(2, 2, 16, 64, "float32"), EngineLayout((spec,) * 2))
    block = ns.kv.block_bytes
    first, second = [(i + 1).to_bytes(16, "little") for i in range(4)], [(i + 9).to_bytes(16, "little") for i in range(4)]
    with Client(instance=instance, runtime_dir=runtime_dir, name="paths", timeout_s=20) as client:
        pool = client.register_layout(ns, PoolSegment.size_for(4, block) + 4096)  # 4 blocks
        assert pool.num_blocks == 4
        kv = StandInKv.create(instance, [(12, *spec.block_shape)] * 2)
        try:
            with DeviceKv.register(client, pool, kv.tensors, mode="worker") as dev:
                assert dev.offload(first, [0, 1, 2, 3]).wait(timeout_s=10).failed == []
                wait_for(lambda: client.stats().disks[0].stored == 4, timeout_s=10)
                assert dev.offload(second, [4, 5, 6, 7]).wait(timeout_s=10).failed == []  # evicts `first` from G2
                wait_for(lambda: client.stats().disks[0].stored == 8, timeout_s=10)
                staged = client.request(p.Lookup(req=0, lease=client.lease, pool_id=pool.pool_id, hashes=first))
                assert staged.tiers == [p.Tier.DISK] * 4
                assert dev.onboard(first, [8, 9, 10, 11]).wait(timeout_s=10).failed == []
        finally:
            kv.close()
        m = Scrape(port)
    assert m("kvbm_transfer_bytes_total", path="g1_to_g2") == 8 * block
    assert m("kvbm_transfer_bytes_total", path="g2_to_g3") == 8 * block
    assert m("kvbm_transfer_bytes_total", path="g3_to_g2") == 4 * block
    assert m("kvbm_transfer_bytes_total", path="g2_to_g1") == 4 * block
    assert m("kvbm_transfer_seconds_count", path="g1_to_g2") == 2  # one per offload job
    assert m("kvbm_transfer_seconds_count", path="g3_to_g2") == 1  # one staging
