"""`KvbmShmStorage` through SGLang 0.5.23's own classes (`HiCacheStorageConfig`, the dynamic
storage backend factory, `MHATokenToKVPoolHost` on CPU) against a real coordinator process.

Runs in `.venv-sglang` (`make test-sglang`); skips elsewhere. No SGLang engine runs here (its
CPU engine needs Intel AMX and a source-built kernel package): the backend is driven the way
SGLang's cache controller drives it (create, register the host pool, batch_exists, batch_get_v1,
batch_set_v1, and the flat-page get/set).
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("sglang.srt.mem_cache.hicache_storage")

from kvbm_shm.client import Client  # noqa: E402
from kvbm_shm.integrations.sglang.layout import UnsupportedHostPool, page_key  # noqa: E402
from tests.procs import run_child  # noqa: E402
from tests.sglang.pools import (MHA_LAYOUTS, MLA_LAYOUTS, PAGE, backend, engine_b, fill_pages,  # noqa: E402
                                host_indices, host_pool, mla_host_pool, page_bytes, storage_config)

pytestmark = pytest.mark.timeout(300)

KEYS = [f"page-hash-{i:02d}" for i in range(4)]
FLAT_KEYS = ["flat-0", "flat-1"]


def _g2_block_ids(instance, runtime_dir, storage, keys) -> list[int]:
    """G2 blocks holding `keys` in the backend's namespace, seen by a separate client."""
    with Client(instance=instance, runtime_dir=runtime_dir) as client:
        pool = client.register_layout(storage.namespace)
        return client.lookup(pool, [page_key(bytes.fromhex(storage.namespace.fingerprint), k) for k in keys])


def test_pages_set_by_one_process_are_read_by_another(coordinator, instance, runtime_dir):
    """Engine A (this process) backs pages up through the zero-copy and the flat-page interface,
    for every MHA layout (the same keys, other bytes per layout); engine B (a spawned process)
    finds them and loads exactly A's bytes; another TP shard finds none of them."""
    written = {}
    for i, layout in enumerate(MHA_LAYOUTS):
        pool = host_pool(layout)
        storage = backend(storage_config(instance, runtime_dir), pool)
        try:
            pages = [1, 7, 3, 10]
            fill_pages(pool, pages + [12, 13], seed=i)
            assert storage.batch_set_v1(KEYS, host_indices(pages)) == [True] * 4
            assert storage.batch_set_v1(KEYS[:2], host_indices(pages[:2])) == [True] * 2  # already cached
            flat = [pool.get_data_page(p * PAGE, flat=True) for p in (12, 13)]
            assert storage.batch_set(FLAT_KEYS, flat)
            written[layout] = (page_bytes(pool, pages), [t.numpy().tobytes() for t in flat])
        finally:
            storage.close()

    seen = run_child(engine_b, instance, str(runtime_dir), KEYS, FLAT_KEYS, list(MHA_LAYOUTS), timeout_s=240)
    for layout in MHA_LAYOUTS:
        b = seen[layout]
        assert b["exists"] == 4 and b["exists_one"] == [True, False]
        assert b["get_v1"] == [True] * 4
        assert b["bytes"] == written[layout][0], layout
        assert b["flat"] == written[layout][1], layout
        assert b["other_tp"] == 0
    assert len({written[layout][0][0] for layout in MHA_LAYOUTS}) == len(MHA_LAYOUTS)


@pytest.mark.parametrize("layout", MLA_LAYOUTS)
def test_mla_pages_are_shared_by_tp_ranks(coordinator, instance, runtime_dir, layout):
    """MLA KV is the same on every TP rank: rank 0 stores, rank 1 loads rank 0's exact bytes; an
    MHA pool of the same model never sees them."""
    pool0, pool1 = mla_host_pool(layout), mla_host_pool(layout)
    rank0 = backend(storage_config(instance, runtime_dir, tp_rank=0, tp_size=2, is_mla=True), pool0)
    rank1 = backend(storage_config(instance, runtime_dir, tp_rank=1, tp_size=2, is_mla=True), pool1)
    mha = backend(storage_config(instance, runtime_dir), host_pool(layout))
    try:
        fill_pages(pool0, [2, 3, 4], seed=3)
        assert rank0.batch_set_v1(KEYS[:3], host_indices([2, 3, 4])) == [True] * 3
        assert rank1.batch_get_v1(KEYS[:3], host_indices([6, 7, 8])) == [True] * 3
        assert page_bytes(pool1, [6, 7, 8]) == page_bytes(pool0, [2, 3, 4])
        assert mha.batch_exists(KEYS[:3]) == 0
    finally:
        for storage in (rank0, rank1, mha):
            storage.close()


def test_a_corrupted_or_absent_page_is_a_miss(coordinator, instance, runtime_dir):
    pool = host_pool("page_first")
    storage = backend(storage_config(instance, runtime_dir), pool)
    try:
        fill_pages(pool, [1, 2, 3, 4], seed=5)
        assert storage.batch_set_v1(KEYS, host_indices([1, 2, 3, 4])) == [True] * 4
        expected = page_bytes(pool, [1, 2])
        g2 = _g2_block_ids(instance, runtime_dir, storage, KEYS)
        assert len(g2) == 4
        with Client(instance=instance, runtime_dir=runtime_dir) as client:
            client.register_layout(storage.namespace).block(g2[2])[100] ^= 0xFF  # bit rot in the third page

        fill_pages(pool, [20, 21, 22, 23], seed=99)  # what the target pages held before
        assert storage.batch_get_v1(KEYS, host_indices([20, 21, 22, 23])) == [True, True, False, False]
        assert page_bytes(pool, [20, 21]) == expected
        assert storage.get(KEYS[2]) is None  # dropped by the service after the failed verification
        assert storage.batch_exists(KEYS) == 2

        assert storage.batch_exists(["absent"] + KEYS) == 0
        assert storage.batch_get_v1(["absent", KEYS[0]], host_indices([20, 21])) == [False, False]
        assert storage.get("absent") is None and not storage.exists("absent")
        assert storage.batch_get_v1(KEYS[:2], host_indices([20])) == [False, False]  # indices of 1 page for 2
    finally:
        storage.close()


def test_coordinator_restart_serves_exact_bytes_or_misses(coordinator_factory, instance, runtime_dir):
    coord = coordinator_factory()
    pool = host_pool("layer_first")
    storage = backend(storage_config(instance, runtime_dir), pool)
    try:
        fill_pages(pool, [1, 2, 3, 4], seed=7)
        expected = page_bytes(pool, [1, 2, 3, 4])
        assert storage.batch_set_v1(KEYS, host_indices([1, 2, 3, 4])) == [True] * 4
        coord.kill()
        # the service is gone: no error; what is still answered (from the pool's hash index, which
        # the killed coordinator left as it was) has the exact bytes
        found = storage.batch_exists(KEYS)
        got = storage.batch_get_v1(KEYS, host_indices([11, 12, 13, 14]))
        loaded = got.count(True)
        assert got == [True] * loaded + [False] * (4 - loaded) and found >= loaded
        assert page_bytes(pool, [11, 12, 13, 14][:loaded]) == expected[:loaded]
        coordinator_factory()  # adopts the killed coordinator's pool

        deadline = time.monotonic() + 30
        while storage.batch_exists(KEYS) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        got = storage.batch_get_v1(KEYS, host_indices([5, 6, 7, 8]))
        loaded = got.count(True)
        assert got == [True] * loaded + [False] * (4 - loaded)
        assert loaded == 4  # the adopted pool still vouches for its blocks
        assert page_bytes(pool, [5, 6, 7, 8]) == expected

        fill_pages(pool, [9], seed=8)
        assert storage.batch_set_v1(["after-restart"], host_indices([9])) == [True]
        assert storage.batch_get_v1(["after-restart"], host_indices([10])) == [True]
        assert page_bytes(pool, [10]) == page_bytes(pool, [9])
    finally:
        storage.close()


def test_without_a_service_every_call_is_a_quick_miss(instance, runtime_dir):
    pool = host_pool("page_first")
    started = time.monotonic()
    storage = backend(storage_config(instance, runtime_dir), pool, wait_s=0)
    try:
        fill_pages(pool, [1], seed=1)
        assert storage.batch_exists(KEYS) == 0
        assert storage.batch_get_v1(KEYS[:1], host_indices([2])) == [False]
        assert storage.batch_set_v1(KEYS[:1], host_indices([1])) == [False]
        assert storage.get(KEYS[0]) is None and storage.set(KEYS[0], pool.get_data_page(PAGE)) is False
    finally:
        storage.close()
    assert time.monotonic() - started < 10


def test_a_pool_it_cannot_share_is_refused(instance, runtime_dir):
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    pool = host_pool("page_first")
    pool.layout = "page_unified"  # a format whose pages are not one flat K/V slice
    storage = StorageBackendFactory.create_backend("dynamic", storage_config(instance, runtime_dir), pool)
    with pytest.raises(UnsupportedHostPool, match="page_unified"):
        storage.register_mem_pool_host(pool)
