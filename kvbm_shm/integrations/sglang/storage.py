"""`KvbmShmStorage`: an SGLang HiCache storage backend on the node's kvbm-shm service.

Every SGLang engine on a node that uses it shares the coordinator's shared-memory pool (G2) and,
below it, its disk tier (G3): a page one engine backed up is found by every other engine of the
same namespace (model, host-pool layout, page size, parallel shard; see `layout`).

Selected through SGLang's dynamic backend loader:

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config
    '{"backend_name": "kvbm_shm", "module_path": "kvbm_shm.integrations.sglang",
      "class_name": "KvbmShmStorage", "interface_v1": 1}'

`interface_v1: 1` makes SGLang call the zero-copy batch interface (`batch_get_v1`/`batch_set_v1`
with host indices): bytes then move in one copy between SGLang's host pool and the shm blocks,
checksummed on store and verified on load, through no intermediate buffer. Other keys of the
extra config (all optional; the client's `KVBM_*` environment variables apply first):
`instance`, `runtime_dir`, `endpoint` (where the coordinator is), `timeout_s` (deadline of one
request, default 2 s: SGLang calls storage from its own I/O threads), `verify_checksums`
(default true), `namespace` (a label added to the model string), `cache_gb` (size of this
namespace's pool; default: the coordinator's budget divided by tp size).

Contract:
- The link to the service starts when SGLang registers its host pool (`register_mem_pool_host`,
  right after construction); while the service is down every page is a miss and every write
  fails, at no cost after the first failed call (`ServiceLink`), and the engine keeps serving.
- `batch_exists(keys)`: the length of the longest cached prefix (one unpinned lookup; a prefix
  that continues on disk is staged into G2 by that lookup). `exists(key)`: that for one key.
- `batch_get_v1(keys, host_indices)`: loads the cached prefix straight into the host pool pages;
  True for the pages loaded and verified, False from the first page that is missing, was evicted
  during the copy or fails its checksum (SGLang then recomputes it). Never True for wrong bytes.
- `batch_set_v1(keys, host_indices)`: stores the pages not cached yet; True for each page that is
  now cached or being written by another engine. When the pool had no room for some page, every
  page of the call is reported False (the client library reports how many pages found no room,
  not which), so SGLang stops backing this request up.
- `get`/`set`/`batch_get`/`batch_set`: the same for flat page tensors (SGLang's older copying
  interface, used without `interface_v1`).
- The v2 interface (hybrid models' extra pools: Mamba, SWA, DSA indexers) is not implemented,
  nor is `clear`: one engine does not empty the node's shared cache.
- `close()`: ends the link (its lease ends; nothing is left pinned).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, List, Optional

import torch

from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from ...config import ClientConfig
from ..service_link import ServiceLink
from .layout import flat_page_view, namespace_for, page_key, page_view

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.0
_CLIENT_KEYS = ("instance", "runtime_dir", "endpoint", "timeout_s", "verify_checksums")


class KvbmShmStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None):
        self.storage_config = storage_config
        extra = dict(storage_config.extra_config or {})
        overrides = {k: extra[k] for k in _CLIENT_KEYS if k in extra}
        if "timeout_s" not in overrides and "KVBM_TIMEOUT_S" not in os.environ:
            overrides["timeout_s"] = DEFAULT_TIMEOUT_S
        self._config = ClientConfig.load(**overrides)
        self._label = str(extra.get("namespace", ""))
        self._cache_bytes = int(float(extra.get("cache_gb", 0)) * (1 << 30))
        self._link: ServiceLink | None = None
        self._lock = threading.Lock()
        self.namespace = None
        self._salt = b""
        self._page_size = 0

    # ------------------------------------------------------------ set-up

    def register_mem_pool_host(self, mem_pool_host) -> None:
        """Derive the namespace from SGLang's host pool and start the link (raises
        `UnsupportedHostPool`, a ValueError, for a pool it cannot share: SGLang's attach fails)."""
        super().register_mem_pool_host(mem_pool_host)
        view, _ = page_view(mem_pool_host)
        namespace = namespace_for(self.storage_config, mem_pool_host, self._label)
        namespace.validate()
        with self._lock:
            if self._link is not None:
                self._link.close()
            self.namespace = namespace
            self._salt = bytes.fromhex(namespace.fingerprint)
            self._page_size = mem_pool_host.page_size
            cache_bytes = self._cache_bytes

            def connect(client):
                pool = client.register_layout(namespace, cache_bytes)
                return pool, pool.bind([view])

            cfg = self.storage_config
            name = f"sglang-tp{cfg.tp_rank}-pp{cfg.pp_rank}-{os.getpid()}"
            self._link = ServiceLink(self._config, name, connect)

    def wait_up(self, timeout_s: float) -> bool:
        """Block until the service link is up (tests and tools; SGLang never calls this)."""
        return self._link is not None and self._link.wait_up(timeout_s)

    def close(self) -> None:
        with self._lock:
            if self._link is not None:
                self._link.close()
                self._link = None

    def _call(self, fn):
        link = self._link
        return None if link is None else link.call(fn)

    def _hashes(self, keys: List[str]) -> list[bytes]:
        return [page_key(self._salt, k) for k in keys]

    def _page_ids(self, keys: List[str], host_indices: torch.Tensor) -> list[int] | None:
        """The host pool page of each key (its first host index / page size), or None when the
        indices do not cover `keys` in whole, aligned pages."""
        p = self._page_size
        if p <= 0 or host_indices.numel() != len(keys) * p:
            log.error("kvbm-shm: %d host indices for %d pages of %d tokens", host_indices.numel(), len(keys), p)
            return None
        starts = host_indices.reshape(len(keys), p)[:, 0].tolist()
        if any(s % p for s in starts):
            log.error("kvbm-shm: host indices %s are not page-aligned (page size %d)", starts[:8], p)
            return None
        return [s // p for s in starts]

    # ------------------------------------------------------------ existence

    def batch_exists(self, keys: List[str], extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        if not keys:
            return 0
        hashes = self._hashes(keys)
        ids = self._call(lambda client, state: client.lookup(state[0], hashes))
        return 0 if ids is None else len(ids)

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # ------------------------------------------------------------ zero-copy interface (v1)

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        pages = self._page_ids(keys, host_indices)
        if not keys or pages is None:
            return [False] * len(keys)
        hashes = self._hashes(keys)
        result = self._call(lambda client, state: client.load(state[1], hashes, pages))
        loaded = 0 if result is None else result.loaded
        return [True] * loaded + [False] * (len(keys) - loaded)

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        pages = self._page_ids(keys, host_indices)
        if not keys or pages is None:
            return [False] * len(keys)
        hashes = self._hashes(keys)
        result = self._call(lambda client, state: client.store(state[1], hashes, pages))
        ok = result is not None and result.no_room == 0
        return [ok] * len(keys)

    # ------------------------------------------------------------ copying interface (flat pages)

    def get(self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None):
        if self.namespace is None:
            return None
        page = target_location if target_location is not None else self.mem_pool_host.get_dummy_flat_data_page()
        view = self._one_page(page)
        if view is None:
            return None
        hashes = self._hashes([key])
        result = self._call(lambda client, state: client.load(state[0].bind([view]), hashes, [0]))
        return page if result is not None and result.loaded == 1 else None

    def _one_page(self, page):
        """A flat page tensor as a one-block tensor of the namespace's layout; None (logged) for a
        tensor of another dtype or size."""
        layout = self.namespace.engine_layout
        if (page.dtype != self.mem_pool_host.dtype or not page.is_contiguous()
                or page.numel() * page.element_size() != layout.block_bytes):
            log.error("kvbm-shm: a page tensor %s %s is not one %d-byte page of %s", tuple(page.shape), page.dtype,
                      layout.block_bytes, self.mem_pool_host.dtype)
            return None
        return flat_page_view(page, layout)

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[torch.Tensor | None]:
        targets = target_locations or [None] * len(keys)
        return [self.get(k, t) for k, t in zip(keys, targets)]

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        if self.namespace is None or value is None:
            return False
        view = self._one_page(value.contiguous())
        if view is None:
            return False
        hashes = self._hashes([key])
        result = self._call(lambda client, state: client.store(state[0].bind([view]), hashes, [0]))
        return result is not None and result.no_room == 0

    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        return all(self.set(k, v) for k, v in zip(keys, values or []))
