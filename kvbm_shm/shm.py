"""POSIX shared-memory segments and the G2 pool segment format.

Primitives:
- `Segment.create(name, size)` / `Segment.attach(name)` / `Segment.close()` / `unlink(name)`:
  a segment is a file under /dev/shm, sized with posix_fallocate (so a full /dev/shm fails at
  creation with `CapacityError`, never with SIGBUS on first write) and pre-faulted (`prefault`,
  without holding the GIL). It is never registered with multiprocessing's resource tracker: the creator
  owns the unlink, attachers only close.
- Ownership: a segment is created O_EXCL with mode 0600; `attach` opens with O_NOFOLLOW and
  checks the opened file (`ownership.check_file`: a regular file of our uid, mode 0600), and
  `unlink` removes only such files. Anything else (another user's file at our name, a link, a
  FIFO, a file open to others) raises `ForeignError` naming it and its owner, and is left alone.
- Segment names come from `names` (`names.pool_name` for pools); `PAGE`, `round_up` and
  `MAX_NAMESPACE_BYTES` are defined here for every format that aligns to pages (G2 and G3).
- `PoolSegment`: one G2 pool. Layout of the segment:

      [header: 4 KiB][block table: num_blocks x 64-byte records][hash index][pad to 4 KiB][block data]

  The header holds magic, format version, geometry, pool id, the coordinator's pid and
  instance, the namespace (msgpack) and shared counters. A block record holds state, sequence
  hash, ref count, generation, checksum, last use, priority and owner. Block i's bytes are
  `block_bytes` long at `data_offset + i * block_stride` (4 KiB aligned, for O_DIRECT).
  The coordinator is the only writer of header and table; it brackets every record update
  with `generation += 1` (odd while writing), and readers use `read_records`, which retries
  records whose generation moved or was odd (a seqlock), so tools can read without the
  coordinator. Clients attach with `table_writable=False` (`SplitSegment`): header and table
  (everything before the page-aligned `data_offset`) are mapped read-only, the block data
  read-write, so a client can write block bytes but never a record or a checksum.
  The hash index (`hash_index`, `index_slots` slots at `index_offset`) maps the hashes of
  Registered blocks to their ids; clients probe it for lookups without asking the coordinator.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import mmap
import os
import time
from pathlib import Path

import numpy as np

from . import ownership
from .errors import CapacityError, CorruptionError, ErrorCode, ForeignError
from .hash_index import SLOT_DTYPE, HashIndex, region_bytes, slots_for
from .names import SEGMENT_PREFIX, pool_name

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PAGE = 4096  # alignment of every block, segment part and G3 slot (O_DIRECT, huge pages aside)
POOL_MAGIC = b"KVBMPOOL"
POOL_FORMAT_VERSION = 3
HEADER_BYTES = 4096
MAX_NAMESPACE_BYTES = 2048  # a namespace's msgpack description, in a pool header and a G3 file header


class BlockState(enum.IntEnum):
    """Lifecycle of a block: RESET -> PARTIAL -> COMPLETE -> REGISTERED -> (evicted) RESET."""

    RESET = 0  # free
    PARTIAL = 1  # allocated to a writer, bytes being written
    COMPLETE = 2  # bytes written, not yet matchable
    REGISTERED = 3  # matchable by hash


RECORD_DTYPE = np.dtype([
    ("generation", "<u8"),
    ("hash", "V16"),
    ("checksum", "<u8"),
    ("last_use_ns", "<u8"),
    ("refcount", "<u4"),
    ("owner", "<u4"),  # client id of the writer (Partial) or the last pinner
    ("hits", "<u4"),
    ("priority", "<i2"),
    ("state", "u1"),
    ("tier", "u1"),  # 2: bytes in this pool; 3: also on disk
    ("alloc_seq", "<u8"),  # bumped whenever the block is handed to a writer: one value, one incarnation
])
assert RECORD_DTYPE.itemsize == 64

COUNTER_NAMES = ("lookups", "lookup_blocks", "hit_blocks", "stored_blocks", "dedup_blocks",
                 "evicted_blocks", "no_room_blocks", "freed_blocks", "invalidated_blocks")

HEADER_DTYPE = np.dtype([
    ("magic", "S8"),
    ("format_version", "<u4"),
    ("header_bytes", "<u4"),
    ("record_bytes", "<u4"),
    ("pool_id", "<u4"),
    ("num_blocks", "<u8"),
    ("block_bytes", "<u8"),
    ("block_stride", "<u8"),
    ("table_offset", "<u8"),
    ("data_offset", "<u8"),
    ("index_offset", "<u8"),
    ("index_slots", "<u8"),
    ("coordinator_pid", "<u4"),
    ("namespace_len", "<u4"),
    ("created_ns", "<u8"),
    ("instance", "S48"),
    ("segment_id", "S32"),
    ("fingerprint", "S32"),
    ("counters", "<u8", (32,)),
    ("namespace", "S%d" % MAX_NAMESPACE_BYTES),
])
assert HEADER_DTYPE.itemsize <= HEADER_BYTES


def round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def shm_free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def free_pool_id(instance: str, first: int, tries: int = 64) -> int:
    """The first pool id from `first` on whose segment name is free. A name taken by a file that
    was not adopted (another user's, see `Coordinator.recover`) is skipped; after `tries` taken
    names, ForeignError names the first one and its owner."""
    for pool_id in range(first, first + tries):
        path = SHM_DIR / pool_name(instance, pool_id)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return pool_id
        if pool_id == first:
            taken = f"{path} is {ownership.describe(st)}"
    raise ForeignError(f"cannot name a new pool of instance {instance!r}: {taken}, and the next {tries - 1} "
                       "names are taken too by files that were not adopted; remove them")


def unlink(name: str) -> bool:
    """Remove one of our segments by name; False if it was already gone, ForeignError if it is not
    ours (another user's file or a link: never removed)."""
    _check_name(name)
    path = SHM_DIR / name
    try:
        ownership.check_file(path, os.lstat(path))
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def list_segments(prefix: str = SEGMENT_PREFIX) -> list[str]:
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


_libc = ctypes.CDLL(None, use_errno=True)
_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23  # Linux 5.14+


def prefault(buf: mmap.mmap, writable: bool) -> None:
    """Fault every page of a mapping in now, without holding the GIL (a ctypes call drops it), so
    the coordinator's loop keeps answering while a pool of gigabytes is mapped (MAP_POPULATE held
    the GIL for the whole populate: 1.4 s for 4 GiB). Kernels without MADV_POPULATE_* (before
    5.14) fault pages in on first use instead."""
    address = np.frombuffer(buf, np.uint8, count=1).ctypes.data
    if _libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(len(buf)),
                     _MADV_POPULATE_WRITE if writable else _MADV_POPULATE_READ):
        log.debug("madvise(MADV_POPULATE) failed (errno %d): pages fault in on first use", ctypes.get_errno())


class Segment:
    """A mapped shm segment. `buf` is the mmap; numpy views come from `view`."""

    def __init__(self, name: str, fd: int, size: int, writable: bool, populate: bool = True):
        self.name = name
        self.size = size
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            self.buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
        finally:
            os.close(fd)
        self.writable = writable
        if populate:
            prefault(self.buf, writable)

    @classmethod
    def create(cls, name: str, size: int) -> "Segment":
        """Create and pre-fault a new segment. CapacityError when /dev/shm cannot hold it."""
        _check_name(name)
        free = shm_free_bytes()
        if size > free:
            raise CapacityError(
                f"/dev/shm has {free / 2**20:.1f} MiB free, segment {name} needs {size / 2**20:.1f} MiB; "
                "lower cpu_cache_gb or enlarge /dev/shm (e.g. docker --shm-size)", ErrorCode.SHM_FULL)
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            try:
                taken = ownership.describe(os.lstat(path))
            except FileNotFoundError:
                taken = "a file that is gone again"
            raise ForeignError(f"cannot create segment {path}: the name is taken by {taken}") from None
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            if e.errno in (errno.ENOSPC, errno.ENOMEM):
                raise CapacityError(
                    f"/dev/shm ran out of space creating {name} ({size / 2**20:.1f} MiB asked, "
                    f"{shm_free_bytes() / 2**20:.1f} MiB free)", ErrorCode.SHM_FULL) from e
            raise
        try:
            return cls(name, fd, size, writable=True)
        except BaseException:
            os.unlink(path)
            raise

    @classmethod
    def attach(cls, name: str, writable: bool = True, populate: bool = True) -> "Segment":
        """Map an existing segment. FileNotFoundError if it does not exist.

        `populate=False` maps lazily: a reader of the header and table (the inspection tools)
        then faults in only the pages it reads, not the whole pool."""
        _check_name(name)
        fd = _open_own(SHM_DIR / name, os.O_RDWR if writable else os.O_RDONLY)
        size = os.fstat(fd).st_size
        if size == 0:
            os.close(fd)
            raise CorruptionError(f"segment {name} is empty")
        return cls(name, fd, size, writable, populate)

    def view(self, dtype, offset: int = 0, count: int = -1) -> np.ndarray:
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=offset)
        return arr

    def address(self) -> int:
        """Address of the first byte of the mapping in this process."""
        return np.frombuffer(self.buf, np.uint8, count=1).ctypes.data

    def close(self) -> None:
        """Unmap. Views handed out must be dropped first; if one is still alive the map stays
        until it is garbage-collected (never a dangling pointer)."""
        try:
            self.buf.close()
        except BufferError:
            pass


def _check_name(name: str) -> None:
    if "/" in name or "\0" in name or not name.startswith(SEGMENT_PREFIX) or len(name.encode()) > 255:
        raise ValueError(f"segment name {name!r} must start with {SEGMENT_PREFIX!r}, contain no '/' or NUL "
                         "and be at most 255 bytes")


def _open_own(path: Path, mode: int) -> int:
    """Open one of our segments (see the module docstring); ForeignError for anything else.
    O_NONBLOCK: a FIFO planted at the name must not block the open."""
    try:
        fd = os.open(path, mode | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EACCES, errno.EPERM, errno.ENXIO):
            try:
                st = os.lstat(path)
            except OSError:
                raise e from None
            ownership.check_file(path, st)
        raise
    try:
        ownership.check_file(path, os.fstat(fd))
    except ForeignError:
        os.close(fd)
        raise
    return fd


class SplitSegment(Segment):
    """A pool segment mapped in two parts from one descriptor: [0, data_offset) read-only (`buf`:
    header and block table), [data_offset, size) read-write if `writable` (`data_buf`: blocks).
    `data_offset` comes from the header and must be page aligned; `PoolSegment` checks that the
    header it then reads names the same offset."""

    def __init__(self, name: str, fd: int, size: int, writable: bool, populate: bool = True):
        self.name = name
        self.size = size
        self.writable = writable
        try:
            head = os.pread(fd, HEADER_DTYPE.itemsize, 0)
            if len(head) < HEADER_DTYPE.itemsize:
                raise CorruptionError(f"segment {name} is {size} bytes, too small for a kvbm pool header")
            self.split = int(np.frombuffer(head, HEADER_DTYPE, 1)[0]["data_offset"])
            if not 0 < self.split < size or self.split % mmap.ALLOCATIONGRANULARITY:
                raise CorruptionError(f"segment {name} has an inconsistent header (data offset {self.split})")
            self.buf = mmap.mmap(fd, self.split, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            self.data_buf = mmap.mmap(fd, size - self.split, flags=mmap.MAP_SHARED, offset=self.split,
                                      prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        finally:
            os.close(fd)
        if populate:
            prefault(self.buf, False)
            prefault(self.data_buf, writable)

    def view(self, dtype, offset: int = 0, count: int = -1) -> np.ndarray:
        if offset >= self.split:
            return np.frombuffer(self.data_buf, dtype=dtype, count=count, offset=offset - self.split)
        return np.frombuffer(self.buf, dtype=dtype, count=count, offset=offset)

    def close(self) -> None:
        for buf in (self.buf, self.data_buf):
            try:
                buf.close()
            except BufferError:
                pass


class PoolSegment:
    """A G2 pool: header, block table and block data in one segment (see module docstring)."""

    def __init__(self, seg: Segment):
        self.segment = seg
        if seg.size < HEADER_BYTES:
            raise CorruptionError(f"segment {seg.name} is {seg.size} bytes, too small for a kvbm pool header")
        self.header = seg.view(HEADER_DTYPE, 0, 1)[0]
        h = self.header
        if bytes(h["magic"]) != POOL_MAGIC:
            raise CorruptionError(f"segment {seg.name} is not a kvbm pool (bad magic)")
        if int(h["format_version"]) != POOL_FORMAT_VERSION:
            raise CorruptionError(
                f"segment {seg.name} has pool format {int(h['format_version'])}, this build reads {POOL_FORMAT_VERSION}")
        self.num_blocks = int(h["num_blocks"])
        self.block_bytes = int(h["block_bytes"])
        self.block_stride = int(h["block_stride"])
        self.data_offset = int(h["data_offset"])
        table_offset = int(h["table_offset"])
        index_offset, index_slots = int(h["index_offset"]), int(h["index_slots"])
        if (int(h["record_bytes"]) != RECORD_DTYPE.itemsize or self.block_stride < self.block_bytes
                or table_offset < HEADER_BYTES
                or table_offset + self.num_blocks * RECORD_DTYPE.itemsize > index_offset
                or index_slots != slots_for(self.num_blocks)
                or index_offset + region_bytes(index_slots) > self.data_offset
                or self.data_offset + self.num_blocks * self.block_stride > seg.size
                or isinstance(seg, SplitSegment) and seg.split != self.data_offset):
            raise CorruptionError(f"segment {seg.name} has an inconsistent header")
        self.table = seg.view(RECORD_DTYPE, table_offset, self.num_blocks)
        self.index = HashIndex(seg.view(np.uint8, index_offset, region_bytes(index_slots)), self.table,
                               BlockState.REGISTERED)
        self.data = seg.view(np.uint8, self.data_offset, self.num_blocks * self.block_stride)
        self.data_address = self.data.ctypes.data
        self.counters = h["counters"]

    @staticmethod
    def _offsets(num_blocks: int) -> tuple[int, int]:
        """(index_offset, data_offset) of a pool of `num_blocks`; the table is at HEADER_BYTES."""
        index_offset = round_up(HEADER_BYTES + num_blocks * RECORD_DTYPE.itemsize, 64)
        return index_offset, round_up(index_offset + region_bytes(slots_for(num_blocks)), PAGE)

    @staticmethod
    def size_for(num_blocks: int, block_bytes: int) -> int:
        return PoolSegment._offsets(num_blocks)[1] + num_blocks * round_up(block_bytes)

    @staticmethod
    def blocks_for(budget_bytes: int, block_bytes: int) -> int:
        """How many blocks a segment of at most `budget_bytes` holds."""
        per_block = round_up(block_bytes) + RECORD_DTYPE.itemsize + 2 * SLOT_DTYPE.itemsize  # at least
        lo, hi = 0, max(0, (budget_bytes - HEADER_BYTES) // per_block)
        while lo < hi:  # the most blocks that fit (the index grows by powers of two)
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if PoolSegment.size_for(mid, block_bytes) <= budget_bytes else (lo, mid - 1)
        return lo

    @classmethod
    def create(cls, name: str, *, pool_id: int, num_blocks: int, block_bytes: int, instance: str,
               segment_id: str, fingerprint: str, namespace: bytes) -> "PoolSegment":
        if len(namespace) > MAX_NAMESPACE_BYTES:
            raise ValueError(f"namespace description is {len(namespace)} bytes, at most {MAX_NAMESPACE_BYTES}")
        stride = round_up(block_bytes)
        table_offset = HEADER_BYTES
        index_offset, data_offset = cls._offsets(num_blocks)
        seg = Segment.create(name, data_offset + num_blocks * stride)
        try:
            h = seg.view(HEADER_DTYPE, 0, 1)[0]
            h["format_version"] = POOL_FORMAT_VERSION
            h["header_bytes"] = HEADER_BYTES
            h["record_bytes"] = RECORD_DTYPE.itemsize
            h["pool_id"] = pool_id
            h["num_blocks"] = num_blocks
            h["block_bytes"] = block_bytes
            h["block_stride"] = stride
            h["table_offset"] = table_offset
            h["data_offset"] = data_offset
            h["index_offset"] = index_offset
            h["index_slots"] = slots_for(num_blocks)
            HashIndex.format(seg.view(np.uint8, index_offset, region_bytes(slots_for(num_blocks))),
                             slots_for(num_blocks))
            h["coordinator_pid"] = os.getpid()
            h["created_ns"] = time.time_ns()
            h["instance"] = instance.encode()
            h["segment_id"] = segment_id.encode()
            h["fingerprint"] = fingerprint.encode()
            h["namespace_len"] = len(namespace)
            h["namespace"] = namespace
            h["magic"] = POOL_MAGIC  # last: a half-written header never looks valid
            del h
            return cls(seg)
        except BaseException:
            seg.close()
            unlink(name)
            raise

    @classmethod
    def attach(cls, name: str, writable: bool = True, populate: bool = True,
               table_writable: bool = True) -> "PoolSegment":
        """Map an existing pool. `table_writable=False` (clients): header and block table
        read-only, block data as `writable` says (see `SplitSegment`)."""
        seg = (Segment if table_writable else SplitSegment).attach(name, writable, populate)
        try:
            return cls(seg)
        except BaseException:
            seg.close()
            raise

    @property
    def name(self) -> str:
        return self.segment.name

    @property
    def segment_id(self) -> str:
        return bytes(self.header["segment_id"]).decode()

    @property
    def fingerprint(self) -> str:
        return bytes(self.header["fingerprint"]).decode()

    @property
    def namespace_bytes(self) -> bytes:
        return bytes(self.header["namespace"])[: int(self.header["namespace_len"])]

    def counter(self, name: str) -> int:
        return int(self.counters[COUNTER_NAMES.index(name)])

    def block(self, block_id: int) -> np.ndarray:
        """Zero-copy uint8 view of one block's bytes."""
        start = block_id * self.block_stride
        return self.data[start:start + self.block_bytes]

    def block_addresses(self, block_ids) -> np.ndarray:
        return np.uint64(self.data_address) + np.asarray(block_ids, np.uint64) * np.uint64(self.block_stride)

    def read_records(self, block_ids=None, retries: int = 100) -> np.ndarray:
        """A consistent copy of block records (seqlock read; see module docstring)."""
        ids = np.arange(self.num_blocks) if block_ids is None else np.asarray(block_ids, np.int64)
        out = np.empty(len(ids), RECORD_DTYPE)
        todo = np.arange(len(ids))
        for _ in range(retries):
            before = self.table["generation"][ids[todo]]
            out[todo] = self.table[ids[todo]]
            after = self.table["generation"][ids[todo]]
            ok = (before == after) & (before % 2 == 0)
            todo = todo[~ok]
            if not len(todo):
                return out
        raise CorruptionError(f"records of {self.name} kept changing during {retries} reads")

    def close(self) -> None:
        for attr in ("header", "table", "index", "data", "counters"):
            self.__dict__.pop(attr, None)
        self.segment.close()
