"""The vLLM integration: `KvbmShmConnector`, a KV connector for vLLM 0.32.

Two ways to select it (see `connector` for its configuration):

    LLM(..., kv_transfer_config={"kv_connector": "KvbmShmConnector",
                                 "kv_connector_module_path": "kvbm_shm.integrations.vllm",
                                 "kv_role": "kv_both", "kv_load_failure_policy": "recompute"})

or, with kvbm-shm installed, without the module path: the package's `vllm.general_plugins` entry
point (`plugin.register`) registers the name with vLLM's `KVConnectorFactory` in every vLLM
process, spawned ones included.

Importing this package does not import vLLM; the connector class is loaded on first access.
"""

from __future__ import annotations

import importlib

__all__ = ["KvbmShmConnector", "KvbmShmMetadata"]

_EXPORTS = {"KvbmShmConnector": "connector", "KvbmShmMetadata": "scheduler"}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
