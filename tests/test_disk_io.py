"""The NVMe I/O worker's job handler, run in this process against a real shm pool and a real
block file: write and read back through pwritev/preadv with verification, and every way a slot
can be bad is reported (per block, with its errno) instead of being served."""

import errno
import os
import uuid

import numpy as np
import pytest

from kvbm_shm.disk import format as g3
from kvbm_shm import protocol as p
from kvbm_shm.kernels import cpu_copy
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


def write(seg, f, blocks, slots, g2_checksums=None):
    """A write job as the coordinator sends it: block b gets hash h(b), generation 10 + slot."""
    g2_checksums = g2_checksums or [cpu_copy.checksum(seg.block(b)) for b in blocks]
    return p.DiskWrite(job_id=7, segment=seg.name, segment_id=seg.segment_id, path=str(f.path), fingerprint=FP,
                       block_ids=blocks, slots=slots, hashes=[h(b) for b in blocks],
                       generations=[10 + s for s in slots], g2_checksums=g2_checksums, priorities=[0] * len(blocks))


def read(seg, f, blocks, slots, hashes, xxh3):
    return p.DiskRead(job_id=8, segment=seg.name, segment_id=seg.segment_id, path=str(f.path), fingerprint=FP,
                      block_ids=blocks, slots=slots, hashes=hashes, generations=[10 + s for s in slots], checksums=xxh3)


def test_write_then_read_back_into_other_blocks(setup):
    seg, f, io = setup
    done = io.handle(write(seg, f, [0, 1, 2], [5, 0, 3]))
    assert done.ok and done.nbytes == 3 * BLOCK and done.job_id == 7
    assert done.checksums == [g3.block_checksum(seg.block(b)) for b in range(3)]  # what the slot headers hold
    want = [seg.block(b).copy() for b in range(3)]
    done = io.handle(read(seg, f, [3, 4, 5], [5, 0, 3], [h(0), h(1), h(2)], done.checksums))
    assert done.ok, done.error
    assert all(np.array_equal(seg.block(3 + i), want[i]) for i in range(3))
    headers, _ = f.read_slot_headers(5, 1)
    assert int(headers[0]["g2_checksum"]) == cpu_copy.checksum(want[0])  # handed back to G2 on staging


def test_a_source_block_that_fails_its_checksum_is_not_written(setup):
    seg, f, io = setup
    sums = [cpu_copy.checksum(seg.block(b)) for b in range(2)]
    done = io.handle(write(seg, f, [0, 1], [0, 1], [sums[0], sums[1] ^ 1]))
    assert (done.ok, done.failed, done.errnos) == (False, [1], [errno.EBADMSG])
    header, n = f.read_slot_headers(1, 1)
    assert g3.check_slot_header(header[0], FP, BLOCK) == "no slot header"


def test_every_kind_of_bad_slot_is_reported(setup):
    seg, f, io = setup
    done = io.handle(write(seg, f, [0, 1, 2, 3], [0, 1, 2, 7]))
    assert done.ok
    with open(f.path, "r+b") as raw:  # one flipped data byte in slot 1
        raw.seek(g3.slot_offset(1, f.slot_bytes) + g3.SLOT_HEADER_BYTES + 1234)
        byte = raw.read(1)
        raw.seek(-1, 1)
        raw.write(bytes([byte[0] ^ 0x10]))
    os.truncate(f.path, g3.slot_offset(7, f.slot_bytes) + 10)  # slot 7 is cut short
    job = read(seg, f, [4, 5, 6, 7], [0, 1, 2, 7], [h(0), h(1), h(2), h(3)], done.checksums)
    job.generations[2] += 1  # the index expects a newer write of slot 2 than the disk holds
    done = io.handle(job)
    assert done.failed == [1, 2, 3]
    assert done.errnos == [errno.EBADMSG, errno.EBADMSG, errno.ENODATA]
    assert done.nbytes == BLOCK


def test_a_replaced_file_is_reopened(setup, tmp_path):
    seg, f, io = setup
    done = io.handle(write(seg, f, [0], [0]))
    assert done.ok
    g2, _ = g3.BlockFile.create(f.path, fingerprint=FP, namespace=b"", block_bytes=BLOCK, num_slots=2)
    done = io.handle(read(seg, f, [1], [0], [h(0)], done.checksums))
    assert done.errnos == [errno.EBADMSG]  # the new file is empty: nothing stale is read through an old fd
    g2.close()
