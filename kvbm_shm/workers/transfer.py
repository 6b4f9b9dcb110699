"""Transfer worker: moves KV blocks between engines' device tensors (G1) and G2 pool blocks.

Started and restarted by the coordinator (`control.supervisor.WorkerGroup`) as
`python -m kvbm_shm.workers.transfer --endpoint E --name N [--copy-path auto|kernel|dma]`; runs
one job at a time (`workers.base.serve_jobs`):

- `TransferJob` offload: gather the device blocks into the G2 blocks, then answer with the
  checksum of every written block (`cpu_copy.checksum`); the coordinator registers them only then.
- `TransferJob` onboard: scatter the G2 blocks into the device blocks, checking every block
  against its checksum (a GPU copy checks first and skips bad blocks), and answer the positions
  that failed in `failed`: the engine must recompute those device blocks.
- `CloseDevice`: drop this process's mappings of an unregistered device's tensors.

A job that raises is answered `ok=False`; the coordinator then treats every block of the job as
not moved. Caches, per process: each device's imported tensors (`device.ipc.HandleCache`: a
handle is opened once), each G2 segment mapped once (and page-locked with cuMemHostRegister
when a GPU copies into it, unregistered before it is unmapped), one copy engine per GPU. Device
tensors on a GPU use `kernels.cuda_copy`; stand-in (shm) tensors use `kernels.cpu_copy`.
"""

from __future__ import annotations

import logging
import os

from .. import protocol as p
from ..device.ipc import HandleCache, TensorView
from ..errors import DeviceError
from ..kernels import cpu_copy
from ..shm import PoolSegment
from .base import serve_jobs, worker_main

log = logging.getLogger(__name__)


class ImportedDevice:
    """A registered device's tensors, mapped into this process, and their chunk table."""

    def __init__(self, spec: p.DeviceSpec, cache: HandleCache):
        self.device_id = spec.device_id
        self._handles: list[p.TensorHandle] = []
        self._cache = cache
        views, on_gpu = [], set()
        try:
            for handle in spec.tensors:
                address, gpu = cache.open(handle)
                self._handles.append(handle)
                views.append(TensorView.of(handle, address))
                on_gpu.add(gpu)
            if len(on_gpu) > 1:
                raise DeviceError(f"device {spec.device_id} mixes GPU and stand-in tensors")
            self.table = spec.layout.bind(views)
        except BaseException:
            self.close()
            raise
        self.on_gpu = on_gpu == {True}
        self.device_uuid = spec.tensors[0].memory.device_uuid if self.on_gpu else b""

    def close(self) -> None:
        for handle in self._handles:
            self._cache.release(handle)
        self._handles = []


class _AttachedPool:
    """A G2 segment mapped in this process; page-locked (PORTABLE: for every GPU) once a GPU copies."""

    def __init__(self, name: str):
        self.segment = PoolSegment.attach(name)
        self.registration = None  # HostRegistration
        self.engines: list = []  # the copy engines that know the registration

    def pin_for(self, engine) -> None:
        from ..kernels.host_register import HostRegistration

        if self.registration is None:
            seg = self.segment
            self.registration = HostRegistration(seg.data_address, seg.num_blocks * seg.block_stride, engine.ordinal)
        if engine not in self.engines:
            engine.add_host_memory(self.registration)
            self.engines.append(engine)

    def close(self) -> None:
        for engine in self.engines:
            engine.remove_host_memory(self.registration)
        self.engines = []
        if self.registration is not None:
            self.registration.close()  # unregister before unmapping
            self.registration = None
        self.segment.close()


class TransferWorker:
    def __init__(self, copy_path: str = "auto", copy_threads: int = 1):
        self.copy_path = copy_path
        self.copy_threads = copy_threads
        self.handles = HandleCache()
        self.devices: dict[int, ImportedDevice] = {}
        self.pools: dict[str, _AttachedPool] = {}
        self._engines: dict[int, object] = {}  # GPU ordinal -> CudaCopyEngine

    def run(self, job: p.TransferJob | p.CloseDevice) -> p.JobDone:
        if isinstance(job, p.CloseDevice):
            device = self.devices.pop(job.device_id, None)
            if device is not None:
                device.close()
                log.info("closed device %d", job.device_id)
            return p.JobDone(job_id=job.job_id, ok=True)
        device = self._device(job.device)
        pool = self._pool(job.pool_segment, job.segment_id)
        if job.offload:
            checksums, nbytes = self._offload(device, pool, job.device_block_ids, job.g2_block_ids)
            return p.JobDone(job_id=job.job_id, ok=True, nbytes=nbytes, checksums=checksums)
        failed, nbytes = self._onboard(device, pool, job.device_block_ids, job.g2_block_ids, job.checksums)
        if failed:
            log.warning("onboard job %d: %d block(s) failed their checksum", job.job_id, len(failed))
        return p.JobDone(job_id=job.job_id, ok=True, failed=failed, nbytes=nbytes)

    def close(self) -> None:
        for device in self.devices.values():
            device.close()
        self.devices.clear()
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()

    def _offload(self, device: ImportedDevice, pool: _AttachedPool, device_ids: list[int],
                 g2_ids: list[int]) -> tuple[list[int], int]:
        """Device blocks -> G2 blocks; returns their checksums and the bytes moved."""
        if not g2_ids:
            return [], 0
        addrs = pool.segment.block_addresses(g2_ids)
        if not device.on_gpu:
            sums = cpu_copy.gather(device.table, device_ids, addrs, self.copy_threads).tolist()
        else:
            self._engine(device.device_uuid, pool).gather(device.table, device_ids, addrs)
            sums = [cpu_copy.checksum(pool.segment.block(b)) for b in g2_ids]
        return sums, len(g2_ids) * device.table.block_bytes

    def _onboard(self, device: ImportedDevice, pool: _AttachedPool, device_ids: list[int], g2_ids: list[int],
                 expected: list[int]) -> tuple[list[int], int]:
        """G2 blocks -> device blocks; returns the positions whose bytes failed their checksum
        (the engine recomputes them) and the bytes moved. A GPU copy verifies first and skips the
        bad blocks; the CPU copy verifies in the same pass as it copies."""
        if not g2_ids:
            return [], 0
        seg = pool.segment
        if not device.on_gpu:
            sums = cpu_copy.scatter(device.table, device_ids, seg.block_addresses(g2_ids), self.copy_threads).tolist()
            failed = [i for i, (c, e) in enumerate(zip(sums, expected)) if c != e] if expected else []
            return failed, len(g2_ids) * device.table.block_bytes
        failed = [i for i, (b, e) in enumerate(zip(g2_ids, expected)) if cpu_copy.checksum(seg.block(b)) != e]
        good = [i for i in range(len(g2_ids)) if i not in set(failed)]
        self._engine(device.device_uuid, pool).scatter(
            device.table, [device_ids[i] for i in good], seg.block_addresses([g2_ids[i] for i in good]))
        return failed, len(good) * device.table.block_bytes

    def _engine(self, device_uuid: bytes, pool: _AttachedPool):
        from ..kernels.cuda_copy import CudaCopyEngine
        from ..kernels.cuda_driver import device_by_uuid

        ordinal = device_by_uuid(device_uuid)
        engine = self._engines.get(ordinal)
        if engine is None:
            engine = self._engines[ordinal] = CudaCopyEngine(ordinal, self.copy_path)
        pool.pin_for(engine)
        return engine

    def _device(self, spec: p.DeviceSpec) -> ImportedDevice:
        device = self.devices.get(spec.device_id)
        if device is None:
            device = self.devices[spec.device_id] = ImportedDevice(spec, self.handles)
            log.info("imported device %d: %d tensor(s)%s", spec.device_id, len(spec.tensors),
                     " on a GPU" if device.on_gpu else " (stand-in)")
        return device

    def _pool(self, name: str, segment_id: str) -> _AttachedPool:
        pool = self.pools.get(name)
        if pool is not None and pool.segment.segment_id != segment_id:  # the segment was recreated
            pool.close()
            pool = None
        if pool is None:
            pool = self.pools[name] = _AttachedPool(name)
        return pool


def main() -> None:
    def options(parser) -> None:
        parser.add_argument("--copy-path", default="auto", choices=("auto", "kernel", "dma"),
                            help="GPU copy path; auto: the faster one for each transfer's region size, "
                                 "measured at first use")
        parser.add_argument("--copy-threads", type=int, default=min(4, os.cpu_count() or 1),
                            help="threads per large host copy (stand-in engines)")

    args = worker_main(__doc__.split("\n", 1)[0], options)
    worker = TransferWorker(args.copy_path, args.copy_threads)
    try:
        serve_jobs(args.endpoint, args.name, p.TransferWorkerJob, worker.run, args.coordinator_pid)
    finally:
        worker.close()


if __name__ == "__main__":
    main()
