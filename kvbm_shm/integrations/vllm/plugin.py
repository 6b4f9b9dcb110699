"""vLLM plugin hook: make `kv_connector="KvbmShmConnector"` work without a module path.

vLLM calls `register()` through the `vllm.general_plugins` entry point in each of its processes
(engine core, workers, the front end), possibly several times; registration is lazy (a module
path and a class name), so nothing heavy is imported here.
"""

from __future__ import annotations

CONNECTOR_NAME = "KvbmShmConnector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "kvbm_shm.integrations.vllm.connector",
                                              CONNECTOR_NAME)
    except ValueError:
        pass  # registered already in this process
