"""The GPU copy engine's decisions, on the CPU: what they decide from real inputs, no GPU needed.

`kernels.cuda_copy` and `kernels.cuda_ipc` keep the logic that must be right before anything is
launched in plain functions over ints and arrays; these tests run them on real buffers, real
chunk tables and the installed cuda-python bindings (no driver is needed and none is faked):

- DMA batches: cuMemcpyBatchAsync gets at most DMA_BATCH_MAX copies per call, all covered once;
- host address translation: a region must lie in a page-locked range start to end;
- block id checks: a typed error before anything is copied;
- path choice from a calibration, and the kernel that cannot load: given up once, one log line;
- NVRTC alone: the kernel compiles where libnvrtc is present (no GPU needed), else the failure is
  the RuntimeError the fallback must catch;
- VMM handle types read as a raw bit mask (POSIX_FD|FABRIC = 9 is not a member of the enum).
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np
import pytest
import torch

from kvbm_shm.errors import DeviceError, ErrorCode, RequestError
from kvbm_shm.kernels import cuda_copy, cuda_driver
from kvbm_shm.kernels.cuda_copy import (DMA_BATCH_MAX, LoadOnce, check_blocks, dma_batches, host_to_device,
                                        pick_path)
from kvbm_shm.layout import EngineLayout


def _nvrtc_loadable() -> bool:
    try:
        cuda_driver.nvrtc().nvrtcVersion()
        return True
    except Exception:  # no cuda-python, or no libnvrtc it can dlopen
        return False


# ---------------------------------------------------------------- DMA batches


def test_dma_batches_bound_every_call_and_cover_every_copy_once():
    n = 262_144  # 1 GiB of 128 KiB blocks, 32 chunks each: what the benchmark sends
    batches = dma_batches(n)
    assert len(batches) == n // DMA_BATCH_MAX == 64
    assert all(hi - lo == DMA_BATCH_MAX for lo, hi in batches)
    assert [lo for lo, _ in batches[1:]] == [hi for _, hi in batches[:-1]]
    assert batches[0][0] == 0 and batches[-1][1] == n
    assert dma_batches(0) == []
    assert dma_batches(1) == [(0, 1)]
    assert dma_batches(4097, 4096) == [(0, 4096), (4096, 4097)]
    assert dma_batches(10, 4) == [(0, 4), (4, 8), (8, 10)]


# ---------------------------------------------------------------- host address translation


def test_host_regions_translate_inside_their_registration():
    a, b = np.zeros(1 << 16, np.uint8), np.zeros(1 << 12, np.uint8)
    ranges = [(a.ctypes.data, a.nbytes, 0), (b.ctypes.data, b.nbytes, -4096)]
    host = np.array([a.ctypes.data, b.ctypes.data + 100, a.ctypes.data + a.nbytes - 36], np.uint64)
    size = np.array([4096, 36, 36], np.uint64)
    got = host_to_device(host, size, ranges)
    assert got.tolist() == [a.ctypes.data, b.ctypes.data + 100 - 4096, a.ctypes.data + a.nbytes - 36]


@pytest.mark.parametrize("start,nbytes", [
    (0, 4097),  # starts inside, ends one byte past the registration
    (4096 - 36, 37),  # the last region ends past it
    (-16, 32),  # starts before it
    (4096, 16),  # wholly after it
])
def test_a_host_region_not_wholly_registered_is_refused(start, nbytes):
    buf = np.zeros(3 * 4096, np.uint8)
    base = buf.ctypes.data + 4096  # the registration is the middle page; the rest is real memory too
    host = np.array([base, base + start], np.uint64)
    size = np.array([16, nbytes], np.uint64)
    with pytest.raises(DeviceError) as e:
        host_to_device(host, size, [(base, 4096, 0)])
    assert f"{base + start:#x}" in str(e.value) and e.value.code == ErrorCode.DEVICE_FAILED


def test_a_region_spanning_two_registrations_is_refused():
    buf = np.zeros(8192, np.uint8)
    lo = buf.ctypes.data
    ranges = [(lo, 4096, 0), (lo + 4096, 4096, 0)]  # adjacent, registered separately
    assert host_to_device(np.array([lo + 4000], np.uint64), np.array([96], np.uint64), ranges).tolist() == [lo + 4000]
    with pytest.raises(DeviceError):
        host_to_device(np.array([lo + 4000], np.uint64), np.array([97], np.uint64), ranges)
    with pytest.raises(DeviceError):
        host_to_device(np.array([lo], np.uint64), np.array([16], np.uint64), [])


# ---------------------------------------------------------------- block ids


def _table(num_blocks: int = 6):
    tensors = [torch.zeros(num_blocks, 1, 3, 6) for _ in range(2)]  # page 3, 1 head, K/V of head_dim 3
    return EngineLayout.of(tensors, 0).bind(tensors)


@pytest.mark.parametrize("ids,addrs,match", [
    ([0, 6], [0, 1], r"\[0, 6\)"),
    ([-1], [0], r"\[0, 6\)"),
    ([0.5], [0], "integers"),
    ([0, 1], [0], "2 device blocks but 1 G2 blocks"),
])
def test_bad_block_ids_are_a_typed_error(ids, addrs, match):
    with pytest.raises(RequestError, match=match) as e:
        check_blocks(_table(), ids, addrs)
    assert e.value.code == ErrorCode.BAD_REQUEST


def test_good_block_ids_pass_as_int64():
    table = _table()
    assert table.chunk_bytes.tolist() == [72, 72]  # 3 tokens x 6 floats: not a multiple of 16 bytes
    ids = check_blocks(table, [5, 0, 3], [0, 1, 2])
    assert ids.dtype == np.int64 and ids.tolist() == [5, 0, 3]
    assert check_blocks(table, [], []).tolist() == []


# ---------------------------------------------------------------- path choice and the kernel fallback

CALIBRATION = {  # the shape `CudaCopyEngine.calibrate` records, GB/s
    4 << 10: {"kernel": 11.0, "dma": 2.5},
    64 << 10: {"kernel": 20.0, "dma": 19.0},
    1 << 20: {"kernel": 21.0, "dma": 24.0},
    4 << 20: {"kernel": 21.0, "dma": 25.5},
}


@pytest.mark.parametrize("region,path", [
    (36, "kernel"), (4 << 10, "kernel"), (48 << 10, "kernel"), (300 << 10, "dma"), (1 << 30, "dma"), (0, "kernel"),
])
def test_auto_picks_the_faster_path_at_the_nearest_measured_size(region, path):
    assert pick_path(CALIBRATION, region) == path


def test_auto_without_a_calibration_is_dma():
    assert pick_path({}, 4096) == "dma"


def test_a_kernel_that_cannot_build_is_given_up_once_with_one_log_line(caplog):
    pytest.importorskip("cuda.bindings")
    calls = []

    def load():
        calls.append(1)
        return cuda_copy.compile_cubin("sm_1")  # no such architecture; or no libnvrtc at all

    kernel = LoadOnce("the copy kernel", load, "GPU copies take the DMA path")
    with caplog.at_level(logging.WARNING, logger="kvbm_shm.kernels.cuda_copy"):
        assert kernel.get() is None
        assert kernel.get() is None
    assert calls == [1]  # never retried: no compile (or calibration) per job
    if _nvrtc_loadable():
        assert kernel.reason.startswith("DeviceError: NVRTC could not compile the copy kernel for sm_1"), kernel.reason
    else:  # the bindings raise a RuntimeError (not a DeviceError) when they cannot dlopen libnvrtc
        assert "libnvrtc" in kernel.reason, kernel.reason
    assert [r.getMessage() for r in caplog.records] == [
        f"the copy kernel is unusable ({kernel.reason}): GPU copies take the DMA path"]


def test_nvrtc_compiles_the_kernel_without_a_gpu_or_says_why_not():
    pytest.importorskip("cuda.bindings")
    if not _nvrtc_loadable():
        with pytest.raises(RuntimeError, match="nvrtc"):  # what LoadOnce turns into the DMA fallback
            cuda_copy.compile_cubin("sm_90")
        return
    one_byte = b" "
    cubin = cuda_copy.compile_cubin("sm_90")
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000
    assert one_byte == bytes([32])  # NVRTC wrote into a bytearray, never into an immutable bytes object
    with pytest.raises(DeviceError, match="gpu-architecture"):  # NVRTC's own log, read into a bytearray
        cuda_copy.compile_cubin("sm_1")


def test_nvrtc_and_its_status_need_no_driver():
    pytest.importorskip("cuda.bindings")
    rtc = cuda_driver.nvrtc()
    assert cuda_driver.check((rtc.nvrtcResult.NVRTC_SUCCESS, 7), "nvrtcSomething") == 7
    with pytest.raises(DeviceError, match="nvrtcSomething failed: NVRTC_ERROR_INVALID_INPUT"):
        cuda_driver.check((rtc.nvrtcResult.NVRTC_ERROR_INVALID_INPUT,), "nvrtcSomething")


# ---------------------------------------------------------------- VMM handle types


def test_requested_handle_types_are_read_as_a_raw_mask():
    cuda_driver_bindings = pytest.importorskip("cuda.bindings.driver")
    from kvbm_shm.device.cuda_ipc import HANDLE_TYPE_FABRIC, HANDLE_TYPE_POSIX_FD, handle_types

    kinds = cuda_driver_bindings.CUmemAllocationHandleType
    assert (int(kinds.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR), int(kinds.CU_MEM_HANDLE_TYPE_FABRIC)) == (
        HANDLE_TYPE_POSIX_FD, HANDLE_TYPE_FABRIC)
    props = cuda_driver_bindings.CUmemAllocationProp()
    props.type = cuda_driver_bindings.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    props.location.id = 3
    for kind in (kinds.CU_MEM_HANDLE_TYPE_NONE, kinds.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                 kinds.CU_MEM_HANDLE_TYPE_FABRIC):
        props.requestedHandleTypes = kind
        assert handle_types(props) == int(kind)
    # the driver fills the struct with a combination: the raw mask reads it, the enum cannot
    ctypes.c_uint32.from_address(int(props.getPtr()) + 4).value = HANDLE_TYPE_POSIX_FD | HANDLE_TYPE_FABRIC
    assert handle_types(props) == 9
    with pytest.raises(ValueError):
        props.requestedHandleTypes  # noqa: B018 - the bindings' own conversion
    assert props.location.id == 3  # the neighbouring fields are where the offset says


@pytest.mark.parametrize("mask,problem", [
    (0x1, None), (0x9, None), (0xB, None),
    (0x8, "FABRIC handle type only (requestedHandleTypes=0x8)"),
    (0x0, "without a shareable handle type (requestedHandleTypes=0x0)"),
    (0x2, "without a shareable handle type (requestedHandleTypes=0x2)"),
])
def test_vmm_export_needs_the_posix_fd_bit(mask, problem):
    from kvbm_shm.device.cuda_ipc import vmm_share_problem

    got = vmm_share_problem(mask)
    assert (got is None) if problem is None else (problem in got and "engine-driven mode" in got)
