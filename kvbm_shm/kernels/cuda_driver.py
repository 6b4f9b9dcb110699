"""The CUDA driver through cuda-python (`cuda.bindings`), loaded on first use, and GPU discovery.

Runs in every process that touches a GPU (engines exporting handles, transfer workers, tools).
Nothing here imports cuda-python at module import time, so `import kvbm_shm` works with no GPU,
no driver and no cuda-python; without a driver the first call raises `DeviceError`.

- `driver()` / `nvrtc()`: the `cuda.bindings` modules (older `cuda.cuda` / `cuda.nvrtc` too);
  `driver()` does `cuInit` once, `nvrtc()` needs no driver (NVRTC compiles without a GPU).
- `gpu_available()`: a driver and at least one GPU are usable (never raises).
- `check(result, call)`: unwrap cuda-python's `(CUresult, *values)` tuples; a failure raises
  `DeviceError` naming the call and the error.
- `device_uuid(ordinal)` / `device_by_uuid(uuid)`: devices are named by UUID across processes,
  never by ordinal (CUDA_VISIBLE_DEVICES may differ between them). The UUID comes from
  `cuDeviceGetUuid_v2` where the bindings have it (12.x; its v1 gives a MIG instance its parent's
  UUID); 13.x has only `cuDeviceGetUuid`, which is the v2 call there.
- `use_device(ordinal)`: make the device's primary context current on this thread (retained
  once per process and kept: the same context PyTorch and the runtime API use).
- `device_of(address)`: ordinal of the device that holds a device pointer.
"""

from __future__ import annotations

import functools
import threading

from ..errors import DeviceError

_lock = threading.Lock()
_contexts: dict[int, object] = {}


@functools.cache
def _bindings():
    """The driver and NVRTC binding modules, imported (loading no library yet)."""
    try:
        try:
            from cuda.bindings import driver as drv, nvrtc as rtc
        except ImportError:  # cuda-python < 12.6
            from cuda import cuda as drv, nvrtc as rtc
    except ImportError as e:
        raise DeviceError(f"cuda-python is not installed ({e}); `pip install cuda-python`") from e
    return drv, rtc


@functools.cache
def _initialised_driver():
    drv = _bindings()[0]
    try:
        (err,) = drv.cuInit(0)
    except Exception as e:  # no libcuda: cuda-python raises instead of returning an error code
        raise DeviceError(f"no CUDA driver: {e}") from e
    if err != drv.CUresult.CUDA_SUCCESS:
        raise DeviceError(f"cuInit failed: {_error_text(drv, err)}")
    return drv


def driver():
    return _initialised_driver()


def nvrtc():
    """The NVRTC bindings; libnvrtc itself loads on the first call (a RuntimeError if it is missing)."""
    return _bindings()[1]


def gpu_available() -> bool:
    try:
        return device_count() > 0
    except DeviceError:
        return False


def device_count() -> int:
    drv = driver()
    return int(check(drv.cuDeviceGetCount(), "cuDeviceGetCount"))


def check(result, call: str):
    """Return the values after the status of a cuda-python call; raise DeviceError on failure."""
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    drv, rtc = _bindings()
    if isinstance(err, drv.CUresult):
        ok = err == drv.CUresult.CUDA_SUCCESS
        text = "" if ok else _error_text(drv, err)
    else:  # nvrtcResult
        ok = err == rtc.nvrtcResult.NVRTC_SUCCESS
        text = "" if ok else getattr(err, "name", str(err))
    if not ok:
        raise DeviceError(f"{call} failed: {text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _error_text(drv, err) -> str:
    try:
        _, name = drv.cuGetErrorName(err)
        _, desc = drv.cuGetErrorString(err)
        return f"{name.decode()} ({desc.decode()})"
    except Exception:  # the error text is a courtesy; the code is what matters
        return str(err)


def device_uuid(ordinal: int) -> bytes:
    drv = driver()
    dev = check(drv.cuDeviceGet(ordinal), "cuDeviceGet")
    call = uuid_call(drv)
    return bytes(check(call(dev), call.__name__).bytes)


def uuid_call(drv):
    """`cuDeviceGetUuid_v2` where the bindings have it (12.x), else `cuDeviceGetUuid` (v2 in 13.x)."""
    return getattr(drv, "cuDeviceGetUuid_v2", None) or drv.cuDeviceGetUuid


def device_by_uuid(uuid: bytes) -> int:
    for ordinal in range(device_count()):
        if device_uuid(ordinal) == uuid:
            return ordinal
    raise DeviceError(f"GPU {uuid.hex()} is not visible to this process (check CUDA_VISIBLE_DEVICES)")


def use_device(ordinal: int) -> None:
    drv = driver()
    with _lock:
        ctx = _contexts.get(ordinal)
        if ctx is None:
            dev = check(drv.cuDeviceGet(ordinal), "cuDeviceGet")
            ctx = check(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            _contexts[ordinal] = ctx
    check(drv.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


def device_of(address: int) -> int:
    drv = driver()
    attr = drv.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
    return int(check(drv.cuPointerGetAttribute(attr, address), "cuPointerGetAttribute(DEVICE_ORDINAL)"))


def device_attribute(ordinal: int, name: str) -> int:
    drv = driver()
    dev = check(drv.cuDeviceGet(ordinal), "cuDeviceGet")
    attr = getattr(drv.CUdevice_attribute, f"CU_DEVICE_ATTRIBUTE_{name}")
    return int(check(drv.cuDeviceGetAttribute(attr, dev), f"cuDeviceGetAttribute({name})"))
