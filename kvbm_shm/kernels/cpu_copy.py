"""Host-memory copy engine: gather/scatter of block chunks at memory speed, with block checksums.

Runs in whichever process moves the bytes (an engine through the client library, or a transfer
worker). Primitives:

- `gather(table, device_block_ids, g2_addrs) -> checksums`: copy device blocks into contiguous G2
  blocks (store/offload) and return each block's checksum.
- `scatter(table, device_block_ids, g2_addrs) -> checksums`: copy G2 blocks into device blocks
  (load/onboard) and return the checksum of the bytes copied, for the caller to verify.
- `checksum(buffer)`: the block checksum of a contiguous G2 block (defined in `_batch_copy.c`:
  a two-lane Fletcher-style sum over 16-byte words, finalised with murmur3's mixer);
  `checksums(blocks, threads)`: of many blocks, split over `threads` threads when 16 MiB or more.
- `copy_batch(dst, src, size)`: raw batched copy.

Addresses are computed in numpy and each batch is one GIL-free call into `_batch_copy` (C), which
streams stores past the cache (a KV block's destination is not read again soon; skipping the
read-for-ownership of every destination line is what lets 64 KiB chunk copies approach one
large memcpy) and sums each block's words while they are in registers, so checksums cost no
extra pass over memory. Chunks that are contiguous on both sides are merged within a block.
With `threads > 1`, a batch of 16 MiB or more is split by whole blocks over that many threads:
one core's copy stays well under the memory bandwidth of the node.
Without the compiled extension (no C compiler at install) the same results come from a loop of
`ctypes.memmove` and numpy, about half as fast; a warning says so once.
No per-token Python, no `index_copy_` (measured 10x slower than per-block copies).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging

import numpy as np

from ..layout import ChunkTable

log = logging.getLogger(__name__)

try:
    from . import _batch_copy as _c
except ImportError:  # built without a C compiler: correct, slower
    _c = None

_M64 = (1 << 64) - 1
_PARALLEL_MIN_BYTES = 16 << 20  # smaller batches are not worth a thread hand-off


def copy_plan(table: ChunkTable, device_block_ids, g2_block_addrs):
    """Copies of a batch: (device addresses, G2 addresses, sizes, block_starts).

    Copies run block by block, chunk by chunk in G2 order within a block; chunks contiguous on
    both sides are merged, never across blocks. Block k is copies block_starts[k]..[k+1]-1.
    """
    n, k = len(g2_block_addrs), len(table.chunk_bytes)
    dev = table.device_addresses(device_block_ids).T  # (n, k)
    g2 = np.asarray(g2_block_addrs, np.uint64)[:, None] + table.dst_offset[None, :]
    size = np.broadcast_to(table.chunk_bytes, (n, k))
    keep = np.ones((n, k), bool)
    if k > 1:
        keep[:, 1:] = (dev[:, 1:] != dev[:, :-1] + size[:, :-1]) | (g2[:, 1:] != g2[:, :-1] + size[:, :-1])
    flat_keep = keep.ravel()
    starts = np.flatnonzero(flat_keep)
    sizes = np.add.reduceat(size.ravel(), starts) if len(starts) else np.zeros(0, np.uint64)
    block_starts = np.concatenate(([0], np.cumsum(keep.sum(axis=1)))).astype(np.uint64)
    return dev.ravel()[starts], g2.ravel()[starts], sizes.astype(np.uint64), block_starts


def gather(table: ChunkTable, device_block_ids, g2_block_addrs, threads: int = 1) -> np.ndarray:
    """Copy device blocks into G2 blocks (same order); returns their checksums (uint64)."""
    _check(table, device_block_ids, g2_block_addrs)
    dev, g2, size, starts = copy_plan(table, device_block_ids, g2_block_addrs)
    return _copy_and_sum(g2, dev, size, starts, g2_block_addrs, table.block_bytes, threads)


def scatter(table: ChunkTable, device_block_ids, g2_block_addrs, threads: int = 1) -> np.ndarray:
    """Copy G2 blocks into device blocks (same order); returns the checksums of the copied bytes."""
    _check(table, device_block_ids, g2_block_addrs)
    dev, g2, size, starts = copy_plan(table, device_block_ids, g2_block_addrs)
    return _copy_and_sum(dev, g2, size, starts, g2_block_addrs, table.block_bytes, threads)


def checksum(block) -> int:
    """Block checksum of a contiguous buffer (a G2 block, or the same bytes anywhere else)."""
    if _c is not None:
        return _c.checksum(block)
    return _checksum_numpy(np.frombuffer(block, np.uint8))


def checksums(blocks: list, threads: int = 1) -> list[int]:
    """`checksum` of every block (contiguous buffers of one size), in order."""
    if not blocks:
        return []
    parts = min(threads, len(blocks)) if len(blocks) * len(blocks[0]) >= _PARALLEL_MIN_BYTES else 1
    edges = [len(blocks) * i // parts for i in range(parts + 1)]
    futures = [_executor(parts - 1).submit(lambda part: [checksum(b) for b in part], blocks[a:b])
               for a, b in zip(edges[1:], edges[2:])]
    return [checksum(b) for b in blocks[:edges[1]]] + [s for f in futures for s in f.result()]


def copy_batch(dst: np.ndarray, src: np.ndarray, size: np.ndarray) -> None:
    """Copy `size[i]` bytes from address `src[i]` to `dst[i]` for every i (uint64 arrays)."""
    if _c is not None:
        _c.copy_batch(_u64(dst), _u64(src), _u64(size))
        return
    _warn_slow()
    for d, s, n in zip(dst.tolist(), src.tolist(), size.tolist()):
        ctypes.memmove(d, s, n)


def _copy_and_sum(dst, src, size, starts, g2_block_addrs, block_bytes: int, threads: int) -> np.ndarray:
    sums = np.zeros(len(starts) - 1, np.uint64)
    if _c is not None and not np.any(size % 16):
        nblocks = len(sums)
        parts = min(threads, nblocks) if nblocks * block_bytes >= _PARALLEL_MIN_BYTES else 1
        edges = [nblocks * i // parts for i in range(parts + 1)]  # whole blocks per thread
        jobs = []
        for a, b in zip(edges, edges[1:]):
            lo, hi = int(starts[a]), int(starts[b])
            args = (_u64(dst[lo:hi]), _u64(src[lo:hi]), _u64(size[lo:hi]), _u64(starts[a:b + 1] - starts[a]),
                    sums[a:b])
            jobs.append(args)
        futures = [_executor(parts - 1).submit(_c.copy_sum_batch, *args) for args in jobs[1:]]
        _c.copy_sum_batch(*jobs[0])
        for f in futures:
            f.result()
        return sums
    copy_batch(dst, src, size)
    for i, addr in enumerate(np.asarray(g2_block_addrs, np.uint64).tolist()):
        sums[i] = checksum((ctypes.c_char * block_bytes).from_address(addr))
    return sums


def _executor(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """Threads that run parts of a large copy beside the caller's thread (the C copy drops the GIL)."""
    global _pool
    if _pool is None or _pool._max_workers < workers:
        _pool = concurrent.futures.ThreadPoolExecutor(max(workers, 1), thread_name_prefix="kvbm-copy")
    return _pool


_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _checksum_numpy(data: np.ndarray) -> int:
    """The same function as `_batch_copy.checksum`, in numpy (wrapping uint64 arithmetic)."""
    n = len(data)
    padded = np.zeros((n + 15) // 16 * 16, np.uint8)
    padded[:n] = data
    words = padded.view("<u8").reshape(-1, 2)
    weights = np.arange(len(words), 0, -1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        a = words.sum(axis=0, dtype=np.uint64)
        b = (words * weights[:, None]).sum(axis=0, dtype=np.uint64)
    h = _fmix64(n ^ 0x9E3779B97F4A7C15)
    for lane in (a[0], a[1], b[0], b[1]):
        h = _fmix64(h ^ int(lane))
    return h


def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _M64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _M64
    return k ^ (k >> 33)


def _u64(a) -> np.ndarray:
    return np.ascontiguousarray(a, np.uint64)


def _warn_slow() -> None:
    if not _warn_slow.done:
        log.warning("kvbm_shm.kernels._batch_copy is not built: host copies run through ctypes.memmove")
        _warn_slow.done = True


_warn_slow.done = False


def _check(table: ChunkTable, device_block_ids, g2_block_addrs) -> None:
    ids = np.asarray(device_block_ids)
    if len(ids) != len(g2_block_addrs):
        raise ValueError(f"{len(ids)} device blocks but {len(g2_block_addrs)} G2 blocks")
    if len(ids) and (ids.min() < 0 or ids.max() >= table.num_device_blocks):
        raise ValueError(f"device block ids must be in [0, {table.num_device_blocks})")
