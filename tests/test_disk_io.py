"""The NVMe I/O worker's job handler, run in this process against a real shm pool and a real
block file: write and read back through pwritev/preadv with verification, and every way a slot
can be bad is reported (per block, with its errno) instead of being served."""

import errno
import os
import uuid

import numpy as np
import pytest

from kvbm_shm import g3
from kvbm_shm import protocol as p
from kvbm_shm.shm import PoolSegment, unlink
from kvbm_shm.workers.disk_io import DiskIo

FP = "ef" * 16
BLOCK = 3 * 4096 + 100
N = 8


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


@pytest.fixture
def setup(tmp_path):
    name = f"kvbm-t{uuid.uuid4().hex[:8]}-pool-0"
    seg = PoolSegment.create(name, pool_id=0, num_blocks=N, block_bytes=BLOCK, instance="t",
                             segment_id=uuid.uuid4().hex, fingerprint=FP, namespace=b"")
    f, _ = g3.BlockFile.create(tmp_path / g3.file_name(FP), fingerprint=FP, namespace=b"",
                               block_bytes=BLOCK, num_slots=8)
    rng = np.random.default_rng(0)
    for b in range(N):
        seg.block(b)[:] = rng.integers(0, 256, BLOCK, np.uint8)
    io = DiskIo(threads=3)
    yield seg, f, io
    f.close()
    seg.close()
    unlink(name)


def job(kind, seg, f, blocks, slots, checksums, hashes=None):
    """A job as the coordinator sends it: block i was written with hash h(i), generation 10 + slot."""
    hashes = hashes or [h(b) for b in blocks]
    return kind(7, seg.name, seg.segment_id, str(f.path), FP, blocks, slots, hashes, checksums,
                [10 + s for s in slots])


def test_write_then_read_back_into_other_blocks(setup):
    seg, f, io = setup
    sums = [g3.block_checksum(seg.block(b)) for b in range(3)]
    done = io.handle(job(p.DiskWrite, seg, f, [0, 1, 2], [5, 0, 3], sums))
    assert done.ok and done.nbytes == 3 * BLOCK and done.job_id == 7
    want = [seg.block(b).copy() for b in range(3)]
    done = io.handle(job(p.DiskRead, seg, f, [3, 4, 5], [5, 0, 3], sums, hashes=[h(0), h(1), h(2)]))
    assert done.ok, done.error
    assert all(np.array_equal(seg.block(3 + i), want[i]) for i in range(3))


def test_a_source_block_that_fails_its_checksum_is_not_written(setup):
    seg, f, io = setup
    sums = [g3.block_checksum(seg.block(b)) for b in range(2)]
    done = io.handle(job(p.DiskWrite, seg, f, [0, 1], [0, 1], [sums[0], sums[1] ^ 1]))
    assert (done.ok, done.failed, done.errnos) == (False, [1], [errno.EBADMSG])
    header, n = f.read_slot_headers(1, 1)
    assert g3.check_slot_header(header[0], FP, BLOCK) == "no slot header"


def test_every_kind_of_bad_slot_is_reported(setup):
    seg, f, io = setup
    sums = [g3.block_checksum(seg.block(b)) for b in range(4)]
    assert io.handle(job(p.DiskWrite, seg, f, [0, 1, 2, 3], [0, 1, 2, 7], sums)).ok
    with open(f.path, "r+b") as raw:  # one flipped data byte in slot 1
        raw.seek(g3.slot_offset(1, f.slot_bytes) + g3.SLOT_HEADER_BYTES + 1234)
        byte = raw.read(1)
        raw.seek(-1, 1)
        raw.write(bytes([byte[0] ^ 0x10]))
    os.truncate(f.path, g3.slot_offset(7, f.slot_bytes) + 10)  # slot 7 is cut short
    read = job(p.DiskRead, seg, f, [4, 5, 6, 7], [0, 1, 2, 7], sums, hashes=[h(0), h(1), h(2), h(3)])
    read.generations[2] += 1  # the index expects a newer write of slot 2 than the disk holds
    done = io.handle(read)
    assert done.failed == [1, 2, 3]
    assert done.errnos == [errno.EBADMSG, errno.EBADMSG, errno.ENODATA]
    assert done.nbytes == BLOCK


def test_a_replaced_file_is_reopened(setup, tmp_path):
    seg, f, io = setup
    sums = [g3.block_checksum(seg.block(0))]
    assert io.handle(job(p.DiskWrite, seg, f, [0], [0], sums)).ok
    g2, _ = g3.BlockFile.create(f.path, fingerprint=FP, namespace=b"", block_bytes=BLOCK, num_slots=2)
    done = io.handle(job(p.DiskRead, seg, f, [1], [0], sums, hashes=[h(0)]))
    assert done.errnos == [errno.EBADMSG]  # the new file is empty: nothing stale is read through an old fd
    g2.close()
