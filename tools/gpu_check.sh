#!/usr/bin/env bash
# GPU check of the device tier, for a session that is lent a GPU machine: one run, nothing
# interactive, well inside a 10-minute command. From the repository root:
#
#   bash tools/gpu_check.sh
#
# The GPU machine has Python 3.12, torch (CUDA), cuda-bindings, numpy, xxhash and pytest, but not
# pyzmq or msgspec, and no network: put their wheels in .whl/ (see README, "GPU check"); they are
# installed into /tmp/site. `.whl/` is git-ignored, and the device tool copies only what git does
# not ignore, so the run must carry it: `run(command="bash tools/gpu_check.sh", carry=[".whl"])`.
# Steps: show the GPU, stop with exit 3 unless cuda.bindings, the driver and torch all see a GPU
# (otherwise every gpu test would skip and the run would look green), say whether NVRTC builds
# the copy kernel, run the gpu-marked tests and the CPU device-tier tests, run the GPU benchmark
# (tools/bench_transfer.py --no-cpu --gpu), print a short table. Logs and the benchmark's JSON go
# to $OUT when it is set (the device tool brings them back), else to /tmp/kvbm-gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-/tmp/kvbm-gpu-check}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing the carried wheels failed"; exit 2; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import zmq, msgspec" || { echo "gpu_check: pyzmq/msgspec missing: carry their wheels in .whl/"; exit 2; }
python3 setup.py -q build_ext --inplace >"$OUT_DIR/build.log" 2>&1 \
    || echo "gpu_check: the C copy engine did not build (see build.log): host copies use the slow fallback"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT_DIR/gpu.txt"
import torch
from kvbm_shm.kernels import cuda_driver
from kvbm_shm.kernels.cuda_copy import compile_cubin

print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
import cuda.bindings
print("cuda-bindings", cuda.bindings.__version__)
print("driver GPUs:", cuda_driver.device_count())  # raises DeviceError without a usable driver
major, minor = (cuda_driver.device_attribute(0, f"COMPUTE_CAPABILITY_{x}") for x in ("MAJOR", "MINOR"))
try:
    print(f"NVRTC: copy kernel for sm_{major}{minor}: {len(compile_cubin(f'sm_{major}{minor}'))} bytes")
except Exception as e:  # the engine falls back to DMA; the kernel tests will fail and say so
    print(f"NVRTC: cannot build the copy kernel: {type(e).__name__}: {e}")
PY
if ! python3 -c "
import sys, torch
from kvbm_shm.kernels import cuda_driver
sys.exit(0 if cuda_driver.gpu_available() and torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no usable GPU (cuda.bindings, the driver or torch failed: see gpu.txt above); nothing was checked"
    exit 3
fi

timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_device.py tests/test_device_tier.py \
    2>&1 | tee "$OUT_DIR/tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 240 python3 tools/bench_transfer.py --no-cpu --gpu --json >"$OUT_DIR/bench.json" 2>"$OUT_DIR/bench.log"
bench_rc=$?

echo
echo "== kvbm-shm GPU check =="
echo "tests: $(tail -n 1 "$OUT_DIR/tests.log") (exit $tests_rc)"
if [ "$bench_rc" -eq 0 ]; then
    python3 - "$OUT_DIR/bench.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(r["machine"])
print(f"{'path':7} {'dir':8} {'block':>7} {'chunk':>7} {'GB/s':>7} {'1 copy':>7} {'ratio':>6}")
for x in r["rows"]:
    print(f"{x['path']:7} {x['direction']:8} {x['block_bytes'] >> 10:>6}K {x['chunk_bytes']:>7} "
          f"{x['gbps']:>7.2f} {x['limit_gbps']:>7.2f} {x['ratio_vs_limit']:>6.2f}")
print("import ms (device initialised first):", r.get("import_ms"))
if r.get("kernel_unusable"):
    print("copy kernel UNUSABLE, its rows ran DMA:", r["kernel_unusable"])
print("calibration (auto path), GB/s:", json.dumps(r.get("calibration")))
PY
else
    echo "benchmark failed (exit $bench_rc):"
    tail -n 20 "$OUT_DIR/bench.log"
fi
exit $(( tests_rc != 0 || bench_rc != 0 ))
