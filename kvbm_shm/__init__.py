"""kvbm-shm: a node-local KV-cache block manager with a shared-memory CPU tier.

The public API, re-exported lazily so that `import kvbm_shm` stays light (no torch, no CUDA,
no running service needed):

    Client, AsyncClient, Pool, EngineKv, StoreResult, LoadResult     (kvbm_shm.client)
    DeviceKv, Transfer, TransferResult                              (kvbm_shm.device.client)
    StandInKv                                                       (kvbm_shm.device.standin)
    Namespace, KvLayout, EngineLayout, TensorSpec                   (kvbm_shm.layout)
    sequence_hashes, salt_for                                       (kvbm_shm.hashing)
    ServiceConfig, ClientConfig                                     (kvbm_shm.config)
    KvbmError and its subclasses (DeviceError too), ErrorCode      (kvbm_shm.errors)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Client": "client", "AsyncClient": "client", "Pool": "client", "EngineKv": "client",
    "StoreResult": "client", "LoadResult": "client",
    "DeviceKv": "device.client", "Transfer": "device.client", "TransferResult": "device.client",
    "StandInKv": "device.standin",
    "Namespace": "layout", "KvLayout": "layout", "EngineLayout": "layout", "TensorSpec": "layout",
    "sequence_hashes": "hashing", "salt_for": "hashing",
    "ServiceConfig": "config", "ClientConfig": "config",
    "KvbmError": "errors", "ErrorCode": "errors", "ProtocolError": "errors", "RequestError": "errors",
    "LeaseError": "errors", "CapacityError": "errors", "CoordinatorUnavailable": "errors",
    "CorruptionError": "errors", "ConfigError": "errors", "DeviceError": "errors", "ForeignError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvbm_shm' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
