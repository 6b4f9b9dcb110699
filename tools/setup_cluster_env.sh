#!/usr/bin/env bash
# Install what the cluster tier (G4, `kvbm-shm serve --cluster ...`) and its tests need.
#
# Usage: tools/setup_cluster_env.sh [VENV_DIR]     (default: .venv, the one `make` creates)
#
# Contract: when this script exits 0, `etcd` is on PATH and VENV_DIR/bin/python imports
# nixl 1.5.1 (the cu12 build, which runs on CPU-only machines with UCX). Idempotent: when both
# are already there it installs nothing. Exit 3: etcd is missing and cannot be installed here
# (not root, or no apt-get): install etcd 3.4+ yourself.
#
# Pitfalls handled or reported here:
#  - nixl and nixl-cu12 are pinned together and installed with --no-deps: nixl 1.5.1 otherwise
#    pulls nixl-cu13 (and its CUDA 13 libraries) too;
#  - the Python etcd client is kvbm_shm.cluster.etcd (etcd's JSON gateway, standard library):
#    nothing to install (etcd3 0.12 does not import with current protobuf);
#  - with libibverbs1 installed and no RDMA device, every NIXL process segfaults at exit unless
#    UCX_MODULES=^ib is set; UCX over TCP uses eth0 unless UCX_NET_DEVICES says otherwise.
set -euo pipefail

VENV_DIR=${1:-.venv}
PY="$VENV_DIR/bin/python"
NIXL_VERSION=1.5.1

if [[ ! -x "$PY" ]]; then
    echo "no python at $PY: create the environment first (make install)" >&2
    exit 2
fi

if ! command -v etcd >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server >/dev/null
    else
        echo "etcd is not installed and this script cannot install it (needs root and apt-get):" >&2
        echo "install etcd 3.4 or newer (Debian/Ubuntu: apt-get install etcd-server)" >&2
        exit 3
    fi
fi

if ! "$PY" - "$NIXL_VERSION" <<'PYEOF' >/dev/null 2>&1
import importlib.metadata as md
import sys

assert md.version("nixl") == sys.argv[1] and md.version("nixl-cu12") == sys.argv[1]
from nixl._api import nixl_agent, nixl_agent_config  # noqa: F401
PYEOF
then
    "$PY" -m pip install -q --disable-pip-version-check --no-deps "nixl==$NIXL_VERSION" "nixl-cu12==$NIXL_VERSION"
    "$PY" -c "from nixl._api import nixl_agent, nixl_agent_config"
fi

if ldconfig -p 2>/dev/null | grep -q libibverbs.so && [[ "${UCX_MODULES:-}" != *"^ib"* ]]; then
    echo "note: libibverbs is installed: without an RDMA device run NIXL processes with UCX_MODULES=^ib" >&2
fi
echo "cluster environment ready: $(etcd --version | head -1); nixl $NIXL_VERSION in $VENV_DIR"
