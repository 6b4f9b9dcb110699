"""The SGLang integration: `KvbmShmStorage`, a HiCache storage backend for SGLang 0.5.

Selected with SGLang's dynamic backend loader (see `storage` for the options):

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvbm_shm",
        "module_path": "kvbm_shm.integrations.sglang", "class_name": "KvbmShmStorage",
        "interface_v1": 1}'

Importing this package does not import SGLang; the backend class is loaded on first access.
"""

from __future__ import annotations

import importlib

__all__ = ["KvbmShmStorage"]


def __getattr__(name: str):
    if name != "KvbmShmStorage":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(".storage", __name__).KvbmShmStorage
