"""Host-memory copy engine: gather/scatter of block chunks at memcpy speed, and block checksums.

Runs in whichever process moves the bytes (an engine through the client library, or a transfer
worker). Addresses are computed in numpy; runs of chunks that are contiguous on both sides are
merged into one copy; the whole batch is then one call into `_batch_copy` (C, no GIL), which
streams copies of 4 KiB and more past the cache with non-temporal stores: a KV block's
destination is not read again soon, and skipping the read-for-ownership of every destination
line is what lets chunked copies approach one large memcpy (glibc's memmove streams only above
~3/4 of the L3 size). Without the compiled extension the batch falls back to a loop of
`ctypes.memmove`, about half as fast, and a warning says so once.
No per-token Python, no `index_copy_` (10x slower than per-block copies, see FACTS.md).
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np
import xxhash

from ..layout import ChunkTable

log = logging.getLogger(__name__)

try:
    from ._batch_copy import copy_batch as _copy_batch
except ImportError:  # built without a C compiler: correct, slower
    _copy_batch = None


def copy_batch(dst: np.ndarray, src: np.ndarray, size: np.ndarray) -> None:
    """Copy `size[i]` bytes from address `src[i]` to `dst[i]` for every i (uint64 arrays)."""
    if _copy_batch is not None:
        _copy_batch(np.ascontiguousarray(dst, np.uint64), np.ascontiguousarray(src, np.uint64),
                    np.ascontiguousarray(size, np.uint64))
        return
    if not copy_batch.warned:
        log.warning("kvbm_shm.kernels._batch_copy is not built: host copies run through ctypes.memmove")
        copy_batch.warned = True
    for d, s, n in zip(dst.tolist(), src.tolist(), size.tolist()):
        ctypes.memmove(d, s, n)


copy_batch.warned = False


def copy_plan(table: ChunkTable, device_block_ids, g2_block_addrs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(device addresses, G2 addresses, sizes) of every chunk, merged where contiguous both sides.

    Chunks are ordered block by block, chunk by chunk within a block.
    """
    dev = table.device_addresses(device_block_ids).T.ravel()  # block-major
    g2 = (np.asarray(g2_block_addrs, np.uint64)[:, None] + table.dst_offset[None, :]).ravel()
    size = np.broadcast_to(table.chunk_bytes, (len(g2_block_addrs), len(table.chunk_bytes))).ravel()
    if len(size) <= 1:
        return dev, g2, np.array(size)
    end_dev, end_g2 = dev[:-1] + size[:-1], g2[:-1] + size[:-1]
    starts = np.flatnonzero(np.concatenate(([True], (dev[1:] != end_dev) | (g2[1:] != end_g2))))
    return dev[starts], g2[starts], np.add.reduceat(size, starts)


def gather(table: ChunkTable, device_block_ids, g2_block_addrs) -> int:
    """Copy device blocks into G2 blocks (same order). Returns bytes copied."""
    _check(table, device_block_ids, g2_block_addrs)
    dev, g2, size = copy_plan(table, device_block_ids, g2_block_addrs)
    copy_batch(g2, dev, size)
    return int(size.sum())


def scatter(table: ChunkTable, device_block_ids, g2_block_addrs) -> int:
    """Copy G2 blocks into device blocks (same order). Returns bytes copied."""
    _check(table, device_block_ids, g2_block_addrs)
    dev, g2, size = copy_plan(table, device_block_ids, g2_block_addrs)
    copy_batch(dev, g2, size)
    return int(size.sum())


def checksum(block: memoryview | np.ndarray) -> int:
    """xxh3-64 of a block's bytes: what the block table records and loaders verify."""
    return xxhash.xxh3_64_intdigest(block)


def _check(table: ChunkTable, device_block_ids, g2_block_addrs) -> None:
    ids = np.asarray(device_block_ids)
    if len(ids) != len(g2_block_addrs):
        raise ValueError(f"{len(ids)} device blocks but {len(g2_block_addrs)} G2 blocks")
    if len(ids) and (ids.min() < 0 or ids.max() >= table.num_device_blocks):
        raise ValueError(f"device block ids must be in [0, {table.num_device_blocks})")
