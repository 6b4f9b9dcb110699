"""The G3 block file format: one pre-allocated file per namespace, one self-describing slot per block.

Shared by the coordinator (creates, sizes and scans files) and the NVMe I/O workers (write and
read slots); besides numpy and xxhash it takes only errors, ownership, the page constants of `shm`
and the file names of `names`. Layout of a file:

    [file header: 4 KiB][slot 0][slot 1]...      slot i at FILE_HEADER_BYTES + i * slot_bytes
    slot = [slot header: 4 KiB][block bytes, padded to 4 KiB]

Every offset and length is a multiple of 4 KiB, so a slot is written or read with one
`pwritev`/`preadv` of [header page, block] straight from or into a page-aligned shm block, with
O_DIRECT where the filesystem allows it.

A slot header records magic, format version, namespace fingerprint, sequence hash, generation
(a per-file write counter: the newest copy of a hash wins), length, the xxh3-64 of the block's
bytes, the G2 block checksum of the same bytes (`kernels.cpu_copy.checksum`, checked against the
G2 block table before the write and handed back to G2 when the block is staged, so a read costs
one pass over the bytes; changing that function means a new FORMAT_VERSION), priority, write
time, and an xxh3-64 of the header itself. A slot is trusted only when `check_slot_header` passes
and, for its bytes, when their xxh3 matches on read: a torn write, a flipped bit, a truncated
file or a block of another namespace or format version is never served. There is no journal:
the headers are the index, and the coordinator rebuilds it from them (`read_slot_headers`).

The file name carries the format version (`g3-v<N>-<fingerprint>.blocks`, `names.g3_file_name`),
so a file of another version is never opened as this one.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import numpy as np
import xxhash

from .. import ownership
from ..errors import CorruptionError
from ..names import G3_PARTIAL_SUFFIX, g3_file_name
from ..names import parse_g3_file_name as parse_file_name  # noqa: F401  (this format's files, by name)
from ..shm import MAX_NAMESPACE_BYTES, PAGE, round_up

FORMAT_VERSION = 1
FILE_HEADER_BYTES = PAGE
SLOT_HEADER_BYTES = PAGE
FILE_MAGIC = b"KVBMG3FL"
SLOT_MAGIC = b"KVBMG3BK"
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # "the disk is full" in its forms

FILE_HEADER_DTYPE = np.dtype([
    ("magic", "S8"),
    ("format_version", "<u4"),
    ("header_bytes", "<u4"),
    ("slot_bytes", "<u8"),
    ("block_bytes", "<u8"),
    ("num_slots", "<u8"),
    ("created_ns", "<u8"),
    ("fingerprint", "S32"),
    ("namespace_len", "<u4"),
    ("pad", "V4"),
    ("namespace", "S%d" % MAX_NAMESPACE_BYTES),
    ("header_checksum", "<u8"),  # xxh3-64 of every byte above
])

SLOT_HEADER_DTYPE = np.dtype([
    ("magic", "S8"),
    ("format_version", "<u4"),
    ("header_bytes", "<u4"),
    ("fingerprint", "S32"),
    ("hash", "V16"),
    ("generation", "<u8"),
    ("length", "<u8"),
    ("checksum", "<u8"),  # xxh3-64 of the block's `length` bytes
    ("g2_checksum", "<u8"),  # the G2 block checksum of the same bytes
    ("written_ns", "<u8"),  # wall clock: orders blocks by age across restarts
    ("priority", "<i2"),
    ("pad", "V6"),
    ("header_checksum", "<u8"),  # xxh3-64 of every byte above
])
_SLOT_SUMMED = SLOT_HEADER_DTYPE.fields["header_checksum"][1]
_FILE_SUMMED = FILE_HEADER_DTYPE.fields["header_checksum"][1]
assert SLOT_HEADER_DTYPE.itemsize <= SLOT_HEADER_BYTES and FILE_HEADER_DTYPE.itemsize <= FILE_HEADER_BYTES


def slot_bytes_for(block_bytes: int) -> int:
    return SLOT_HEADER_BYTES + round_up(block_bytes)


def slot_offset(slot: int, slot_bytes: int) -> int:
    return FILE_HEADER_BYTES + slot * slot_bytes


def file_bytes(num_slots: int, block_bytes: int) -> int:
    return FILE_HEADER_BYTES + num_slots * slot_bytes_for(block_bytes)


def slots_for(budget_bytes: int, block_bytes: int) -> int:
    """How many slots a file of at most `budget_bytes` holds."""
    return max(0, (budget_bytes - FILE_HEADER_BYTES) // slot_bytes_for(block_bytes))


def file_name(fingerprint: str) -> str:
    """The block file name of a namespace in this format."""
    return g3_file_name(fingerprint, FORMAT_VERSION)


# ---------------------------------------------------------------- slot headers


def slot_headers(buf, count: int) -> np.ndarray:
    """Structured view of `count` slot headers laid out one per 4 KiB page of `buf`."""
    return np.ndarray(count, SLOT_HEADER_DTYPE, buffer=buf, strides=(SLOT_HEADER_BYTES,))


def pack_slot_header(rec: np.ndarray, *, fingerprint: str, hash: bytes, generation: int, length: int,
                     checksum: int, g2_checksum: int, priority: int) -> None:
    """Fill one slot header record (a view into a header page) and seal it with its checksum."""
    rec["magic"] = SLOT_MAGIC
    rec["format_version"] = FORMAT_VERSION
    rec["header_bytes"] = SLOT_HEADER_BYTES
    rec["fingerprint"] = fingerprint.encode()
    rec["hash"] = np.void(hash)
    rec["generation"] = generation
    rec["length"] = length
    rec["checksum"] = checksum
    rec["g2_checksum"] = g2_checksum
    rec["written_ns"] = time.time_ns()
    rec["priority"] = priority
    rec["header_checksum"] = _record_checksum(rec, _SLOT_SUMMED)


def check_slot_header(rec: np.ndarray, fingerprint: str, block_bytes: int) -> str | None:
    """Why this slot header cannot be trusted for this namespace, or None when it can."""
    if bytes(rec["magic"]) != SLOT_MAGIC:
        return "no slot header"
    if int(rec["format_version"]) != FORMAT_VERSION or int(rec["header_bytes"]) != SLOT_HEADER_BYTES:
        return f"slot format {int(rec['format_version'])}, this build reads {FORMAT_VERSION}"
    if int(rec["header_checksum"]) != _record_checksum(rec, _SLOT_SUMMED):
        return "slot header checksum mismatch"
    if bytes(rec["fingerprint"]).decode(errors="replace") != fingerprint:
        return "slot belongs to another namespace"
    if int(rec["length"]) != block_bytes:
        return f"slot holds {int(rec['length'])} bytes, the namespace's blocks are {block_bytes}"
    return None


def block_checksum(block) -> int:
    """xxh3-64 of a block's bytes: what a slot header vouches for."""
    return xxhash.xxh3_64_intdigest(block)


def _record_checksum(rec: np.ndarray, summed: int) -> int:
    return xxhash.xxh3_64_intdigest(rec.tobytes()[:summed])


# ---------------------------------------------------------------- files


class BlockFile:
    """An open G3 file as the coordinator sees it: geometry from the validated file header."""

    def __init__(self, path: Path, fd: int, header: np.ndarray):
        self.path = Path(path)
        self.fd = fd
        self.fingerprint = bytes(header["fingerprint"]).decode()
        self.block_bytes = int(header["block_bytes"])
        self.slot_bytes = int(header["slot_bytes"])
        self.num_slots = int(header["num_slots"])
        self.namespace = bytes(header["namespace"])[: int(header["namespace_len"])]
        self._header = header

    @classmethod
    def create(cls, path: Path, *, fingerprint: str, namespace: bytes, block_bytes: int,
               num_slots: int) -> tuple["BlockFile", bool]:
        """Create (replacing any file there) and pre-allocate. Returns (file, fully pre-allocated):
        when the filesystem has no room for all of it the file stays sparse, and writes to slots
        the disk cannot hold fail with ENOSPC."""
        if len(namespace) > MAX_NAMESPACE_BYTES:
            raise ValueError(f"namespace description is {len(namespace)} bytes, at most {MAX_NAMESPACE_BYTES}")
        tmp = path.with_name(path.name + G3_PARTIAL_SUFFIX)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            header = np.zeros((), FILE_HEADER_DTYPE)
            header["format_version"] = FORMAT_VERSION
            header["header_bytes"] = FILE_HEADER_BYTES
            header["slot_bytes"] = slot_bytes_for(block_bytes)
            header["block_bytes"] = block_bytes
            header["num_slots"] = num_slots
            header["created_ns"] = time.time_ns()
            header["fingerprint"] = fingerprint.encode()
            header["namespace_len"] = len(namespace)
            header["namespace"] = namespace
            header["magic"] = FILE_MAGIC
            f = cls(path, fd, header)
            allocated = f._allocate(0, file_bytes(num_slots, block_bytes))
            f._write_header()
            os.replace(tmp, path)  # a half-made file never carries the real name
            return f, allocated
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    @classmethod
    def open(cls, path: Path) -> "BlockFile":
        """Open an existing file; ForeignError when it is not ours (another user's, a link, not 0600),
        CorruptionError when its header is not a valid G3 header."""
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            ownership.check_file(path, os.fstat(fd))
            raw = os.pread(fd, FILE_HEADER_BYTES, 0)
            if len(raw) < FILE_HEADER_DTYPE.itemsize:
                raise CorruptionError(f"{path}: too short for a G3 file header")
            header = np.frombuffer(raw, FILE_HEADER_DTYPE, count=1)[0].copy()
            if bytes(header["magic"]) != FILE_MAGIC:
                raise CorruptionError(f"{path}: not a G3 block file (bad magic)")
            if int(header["format_version"]) != FORMAT_VERSION:
                raise CorruptionError(f"{path}: G3 format {int(header['format_version'])}, this build reads {FORMAT_VERSION}")
            if int(header["header_checksum"]) != _record_checksum(header, _FILE_SUMMED):
                raise CorruptionError(f"{path}: file header checksum mismatch")
            if int(header["slot_bytes"]) != slot_bytes_for(int(header["block_bytes"])):
                raise CorruptionError(f"{path}: inconsistent slot geometry")
            return cls(path, fd, header)
        except BaseException:
            os.close(fd)
            raise

    def resize(self, num_slots: int) -> bool:
        """Grow (pre-allocating the new slots) or shrink the file. Returns whether every byte is
        allocated (see `create`)."""
        size = file_bytes(num_slots, self.block_bytes)
        allocated = True
        if num_slots > self.num_slots:
            allocated = self._allocate(file_bytes(self.num_slots, self.block_bytes), size)
        else:
            os.ftruncate(self.fd, size)
        self.num_slots = num_slots
        self._header["num_slots"] = num_slots
        self._write_header()
        return allocated

    def ensure_size(self) -> bool:
        """Re-extend a file that was truncated behind our back; True when it was."""
        want = file_bytes(self.num_slots, self.block_bytes)
        if os.fstat(self.fd).st_size >= want:
            return False
        os.ftruncate(self.fd, want)
        return True

    def size_bytes(self) -> int:
        return file_bytes(self.num_slots, self.block_bytes)

    def read_slot_headers(self, first: int, count: int) -> tuple[np.ndarray, int]:
        """Copies of the headers of slots [first, first + count), and how many could be read
        (fewer when the file was cut short)."""
        out = np.zeros(count, SLOT_HEADER_DTYPE)
        n = 0
        for i in range(count):
            raw = os.pread(self.fd, SLOT_HEADER_DTYPE.itemsize, slot_offset(first + i, self.slot_bytes))
            if len(raw) < SLOT_HEADER_DTYPE.itemsize:
                break
            out[i] = np.frombuffer(raw, SLOT_HEADER_DTYPE, count=1)[0]
            n += 1
        return out, n

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _allocate(self, start: int, end: int) -> bool:
        try:
            os.posix_fallocate(self.fd, start, end - start)
            return True
        except OSError as e:
            if e.errno not in NO_SPACE_ERRNOS:
                raise
            os.ftruncate(self.fd, end)  # sparse: the disk holds what it has room for
            return False

    def _write_header(self) -> None:
        self._header["header_checksum"] = _record_checksum(self._header, _FILE_SUMMED)
        page = bytearray(FILE_HEADER_BYTES)
        page[:FILE_HEADER_DTYPE.itemsize] = self._header.tobytes()
        os.pwrite(self.fd, page, 0)
