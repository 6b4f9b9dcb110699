#!/usr/bin/env bash
# Create (or verify) the virtual environment that runs the SGLang HiCache backend tests.
#
# Usage: tools/setup_sglang_env.sh VENV_DIR
#
# Contract: when this script exits 0, VENV_DIR/bin/python imports SGLang 0.5.23's HiCache storage
# interface, its storage backend factory and its MHA host pool on torch 2.13.0+cpu, together with
# the packages kvbm-shm and its tests need. Idempotent: if the environment already passes that
# check it does nothing. A broken or partial environment is repaired in place (pip is re-run;
# nothing is deleted). Exit 3: the packages could not be downloaded (no network), so the caller
# can skip rather than fail.
#
# Pitfalls handled here:
#  - sglang 0.5.23 pins torch==2.14.1 and a CUDA stack (flashinfer, sgl-kernel, deep-gemm, ...):
#    it goes in with --no-deps, torch is pinned to 2.13.0 (an unpinned torch pulls a multi-GB CUDA
#    build) and only what `import sglang.srt.mem_cache...` needs is installed, at sglang's own
#    pins where it has them;
#  - sglang's model configs import torchvision; the only torchvision for torch 2.13 on PyPI
#    (0.28.0) is a CUDA build whose C++ ops cannot load next to CPU torch, and its
#    _meta_registrations then fails on two fake-op registrations that, unlike its others, are not
#    guarded by `_has_ops()`. The two lines are rewritten to use its own guarded decorator; only
#    torchvision's pure-Python parts (transforms) are used.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
VENV_DIR=$1
PY="$VENV_DIR/bin/python"

SGLANG_VERSION=0.5.23
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
KVBM_PACKAGES=(pyzmq msgspec xxhash numpy pytest pytest-timeout)
# What importing SGLang's mem_cache modules needs, at sglang 0.5.23's pins where it has one.
SGLANG_IMPORT_PACKAGES=(orjson psutil pybase64 requests pillow aiohttp pydantic dill gguf ipython
                        triton loguru starlette "transformers==5.19.0" "tokenizers==0.23.2"
                        "sentencepiece==0.2.1" "compressed-tensors==0.18.0" "apache-tvm-ffi==0.1.11")

check() {
    [[ -x "$PY" ]] || return 1
    "$PY" - "$SGLANG_VERSION" "$TORCH_VERSION" <<'PYEOF' >/dev/null 2>&1
import importlib.metadata as md
import sys
import warnings

want_sglang, want_torch = sys.argv[1], sys.argv[2]
assert md.version("sglang") == want_sglang
assert md.version("torch") == want_torch + "+cpu"
import msgspec, numpy, pytest, pytest_timeout, xxhash, zmq  # noqa: E401,F401
warnings.simplefilter("ignore")
import sglang.srt.mem_cache.hicache_storage  # noqa: F401
import sglang.srt.mem_cache.pool_host.mha  # noqa: F401
import sglang.srt.mem_cache.storage.backend_factory  # noqa: F401
PYEOF
}

if check; then
    exit 0
fi

echo "setting up the SGLang CPU environment in $VENV_DIR (about two minutes)" >&2
if [[ ! -x "$PY" ]]; then
    python3 -m venv "$VENV_DIR"
fi
LOG="$VENV_DIR/setup.log"
pip_logged() {
    if ! "$PY" -m pip "$@" >>"$LOG" 2>&1; then
        if grep -qE "No matching distribution|Failed to establish a new connection|Temporary failure in name resolution|Network is unreachable" "$LOG"; then
            echo "error: pip $* could not download its packages (no network?); the end of $LOG:" >&2
            grep -v "is ignored: it is neither" "$LOG" | tail -n 5 >&2
            exit 3
        fi
        echo "error: pip $* failed; the end of $LOG:" >&2
        grep -v "is ignored: it is neither" "$LOG" | tail -n 30 >&2
        exit 1
    fi
}
: >"$LOG"
pip_logged install --upgrade pip
pip_logged install "torch==$TORCH_VERSION"
pip_logged install --no-deps "sglang==$SGLANG_VERSION" "torchvision==$TORCHVISION_VERSION"
# Keep torch pinned while adding the rest, so no resolver step can swap it for a CUDA build.
pip_logged install "torch==$TORCH_VERSION" "${KVBM_PACKAGES[@]}" "${SGLANG_IMPORT_PACKAGES[@]}"

META=$("$PY" -c 'import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec("torchvision").origin), "_meta_registrations.py"))')
sed -i 's/^@torch\.library\.register_fake("torchvision::\(q\{0,1\}nms\)")$/@register_meta("\1")/' "$META"

if ! check; then
    echo "error: $VENV_DIR does not import sglang $SGLANG_VERSION's HiCache modules on torch $TORCH_VERSION" >&2
    "$PY" -W ignore -c "import sglang.srt.mem_cache.pool_host.mha, sglang.srt.mem_cache.storage.backend_factory" 2>&1 \
        | tail -n 5 >&2 || true
    exit 1
fi
echo "SGLang CPU environment ready in $VENV_DIR" >&2
