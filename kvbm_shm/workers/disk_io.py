"""NVMe I/O worker: moves blocks between G2 shm pools and G3 block files. Runs in its own process,
started and supervised by the coordinator (`control.supervisor.WorkerGroup`):

    python -m kvbm_shm.workers.disk_io --endpoint E --name N --lock G3_IO_LOCK [--threads T]

Jobs (`protocol.DiskWrite`, `protocol.DiskRead`) come one at a time; the blocks of a job go
through a pool of T threads, each issuing one `pwritev`/`preadv` of [slot header page, block]
straight from or into the mmap'd shm block (no copy; the syscalls release the GIL), so T
operations are in flight per worker. Files are opened with O_DIRECT; a filesystem that refuses
it gets buffered I/O and one warning naming the file. A write first checks the block against
its G2 checksum (so that bad bytes are never made durable), then seals the slot header with the
xxh3-64 of the bytes; a read checks the header and the xxh3 of what it read.

Each job is answered with one `JobDone`: `failed` lists the positions that did not complete and
`errnos` says why (EBADMSG: bytes or header failed verification; ENODATA: the slot lies past the
end of a truncated file; ENOSPC and friends: the disk is full; anything else: an I/O error);
for a write, `checksums` holds the xxh3-64 each written slot header carries.
Nothing is visible until the coordinator has the answer: it registers a block only after this
worker reported it good, so a worker that dies mid-job leaves nothing half-written in use.

While it lives the worker holds a shared lock on G3_IO_LOCK, so that a coordinator starting
after a crash can wait for the previous coordinator's workers to finish their last job.
"""

from __future__ import annotations

import concurrent.futures
import errno
import fcntl
import logging
import mmap
import os

from ..disk import format as g3
from .. import protocol as p
from ..kernels import cpu_copy
from ..shm import PoolSegment
from .base import serve_jobs, worker_main

log = logging.getLogger("kvbm_shm.workers.disk_io")


class _Segments:
    """G2 pool segments attached by name, re-attached when the coordinator recreated one."""

    def __init__(self):
        self._by_name: dict[str, PoolSegment] = {}

    def get(self, name: str, segment_id: str) -> PoolSegment:
        seg = self._by_name.get(name)
        if seg is None or seg.segment_id != segment_id:
            if seg is not None:
                seg.close()
            seg = self._by_name[name] = PoolSegment.attach(name, populate=False)  # only moved blocks get faulted in
            if seg.segment_id != segment_id:
                raise FileNotFoundError(errno.ENOENT, f"segment {name} is not the one the job names")
        return seg


class _File:
    """An open G3 file: O_DIRECT when the filesystem allows it, else buffered."""

    def __init__(self, path: str):
        self.path = path
        header = g3.BlockFile.open(path)  # validates the file header
        self.fingerprint = header.fingerprint
        self.block_bytes = header.block_bytes
        self.slot_bytes = header.slot_bytes
        self.inode = os.fstat(header.fd).st_ino
        self.fd = header.fd
        self.direct = False
        try:
            direct_fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            log.warning("%s: the filesystem refuses O_DIRECT; using buffered I/O", path)
        else:
            os.close(self.fd)
            self.fd, self.direct = direct_fd, True

    def io(self, op, buffers: list, offset: int) -> int:
        try:
            return op(self.fd, buffers, offset)
        except OSError as e:
            if not (self.direct and e.errno == errno.EINVAL):
                raise
        log.warning("%s: O_DIRECT I/O refused (EINVAL); switching to buffered I/O", self.path)
        self._reopen_buffered()
        return op(self.fd, buffers, offset)

    def _reopen_buffered(self) -> None:
        if self.direct:
            fd = os.open(self.path, os.O_RDWR)
            os.close(self.fd)
            self.fd, self.direct = fd, False

    def close(self) -> None:
        os.close(self.fd)


class _Files:
    """Open G3 files by path; a path whose file was replaced is opened again."""

    def __init__(self):
        self._by_path: dict[str, _File] = {}

    def get(self, path: str) -> _File:
        f = self._by_path.get(path)
        if f is not None and os.stat(path).st_ino != f.inode:
            f.close()
            f = None
        if f is None:
            f = self._by_path[path] = _File(path)
        return f


class DiskIo:
    """Runs disk jobs: one thread-pool task per block. Runs in the worker process."""

    def __init__(self, threads: int):
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="kvbm-disk-io")
        self._segments = _Segments()
        self._files = _Files()
        self._headers = mmap.mmap(-1, g3.SLOT_HEADER_BYTES)

    def handle(self, job: p.DiskJob) -> p.JobDone:
        seg = self._segments.get(job.segment, job.segment_id)
        f = self._files.get(job.path)
        if f.fingerprint != job.fingerprint or f.block_bytes != seg.block_bytes:
            raise ValueError(f"{job.path} holds blocks of {f.fingerprint} ({f.block_bytes} bytes), "
                             f"the job is for {job.fingerprint} ({seg.block_bytes} bytes)")
        n = len(job.block_ids)
        headers = self._header_pages(n)
        recs = g3.slot_headers(headers, n)
        one = self._write_one if isinstance(job, p.DiskWrite) else self._read_one
        results = list(self._pool.map(lambda i: one(job, i, seg, f, headers, recs[i]), range(n)))
        failed = [i for i, (e, _, _) in enumerate(results) if e]
        errnos = [results[i][0] for i in failed]
        error = ""
        if failed:
            first = {}
            for i in failed:
                first.setdefault(results[i][0], (i, results[i][1]))
            for e, (i, why) in first.items():  # one line per kind of failure, not per block
                log.warning("%s of %s: %d block(s) failed with %s, e.g. slot %d: %s", type(job).__name__, f.path,
                            errnos.count(e), errno.errorcode.get(e, e), job.slots[i], why)
            kinds = sorted(errno.errorcode.get(e, str(e)) for e in first)
            error = f"{len(failed)} of {n} blocks failed ({', '.join(kinds)})"
        checksums = [c for _, _, c in results] if isinstance(job, p.DiskWrite) else []
        return p.JobDone(job_id=job.job_id, ok=not failed, error=error, failed=failed,
                         nbytes=(n - len(failed)) * seg.block_bytes, checksums=checksums, errnos=errnos)

    def _header_pages(self, n: int) -> mmap.mmap:
        """Page-aligned room for n slot headers (O_DIRECT needs aligned buffers), reused across
        jobs: jobs run one at a time."""
        if len(self._headers) < n * g3.SLOT_HEADER_BYTES:
            self._headers = mmap.mmap(-1, n * g3.SLOT_HEADER_BYTES)
        return self._headers

    def _write_one(self, job: p.DiskWrite, i: int, seg: PoolSegment, f: _File, headers, rec) -> tuple[int, str, int]:
        """(0, "", xxh3 of the bytes) or (errno, why, 0) for block i of the job."""
        b, slot = job.block_ids[i], job.slots[i]
        block = seg.block(b)
        if cpu_copy.checksum(block) != job.g2_checksums[i]:
            return errno.EBADMSG, f"G2 block {b} of {seg.name} does not match its checksum: not written", 0
        xxh3 = g3.block_checksum(block)
        g3.pack_slot_header(rec, fingerprint=job.fingerprint, hash=job.hashes[i], generation=job.generations[i],
                            length=seg.block_bytes, checksum=xxh3, g2_checksum=job.g2_checksums[i],
                            priority=job.priorities[i])
        buffers = [memoryview(headers)[i * g3.SLOT_HEADER_BYTES:(i + 1) * g3.SLOT_HEADER_BYTES], _stride(seg, b)]
        want = f.slot_bytes
        try:
            done = f.io(os.pwritev, buffers, g3.slot_offset(slot, f.slot_bytes))
        except OSError as e:
            return e.errno or errno.EIO, str(e), 0
        if done != want:  # a short write: the disk ran out of room part-way
            return errno.ENOSPC, f"{done} of {want} bytes written", 0
        return 0, "", xxh3

    def _read_one(self, job: p.DiskRead, i: int, seg: PoolSegment, f: _File, headers, rec) -> tuple[int, str, int]:
        """(0, "", 0) or (errno, why, 0) for block i of the job; on failure the G2 block holds garbage."""
        b, slot = job.block_ids[i], job.slots[i]
        buffers = [memoryview(headers)[i * g3.SLOT_HEADER_BYTES:(i + 1) * g3.SLOT_HEADER_BYTES], _stride(seg, b)]
        try:
            done = f.io(os.preadv, buffers, g3.slot_offset(slot, f.slot_bytes))
        except OSError as e:
            return e.errno or errno.EIO, str(e), 0
        if done < g3.SLOT_HEADER_BYTES + seg.block_bytes:
            return errno.ENODATA, "the slot lies past the end of the file (truncated)", 0
        why = g3.check_slot_header(rec, job.fingerprint, seg.block_bytes)
        if why is None and (bytes(rec["hash"]) != job.hashes[i] or int(rec["generation"]) != job.generations[i]
                            or int(rec["checksum"]) != job.checksums[i]):
            why = "slot holds another block than the index says"
        if why is None and g3.block_checksum(seg.block(b)) != job.checksums[i]:
            why = "block bytes do not match their checksum"
        if why is not None:
            return errno.EBADMSG, f"failed verification ({why})", 0
        return 0, "", 0


def _stride(seg: PoolSegment, block_id: int):
    """The block's bytes plus its padding to 4 KiB: what O_DIRECT moves."""
    start = block_id * seg.block_stride
    return seg.data[start:start + seg.block_stride]


def main() -> None:
    args = worker_main("kvbm-shm NVMe I/O worker", lambda parser: (
        parser.add_argument("--lock", required=True, help="G3 I/O lock file (held shared while alive)"),
        parser.add_argument("--threads", type=int, default=4, help="blocks in flight per worker")))
    lock_fd = os.open(args.lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_SH)
    serve_jobs(args.endpoint, args.name, p.DiskJob, DiskIo(args.threads).handle, args.coordinator_pid)


if __name__ == "__main__":
    main()
