"""Creating a segment pre-faults every page without holding the GIL: the coordinator creates pools on
a thread beside its request loop, which must keep running (MAP_POPULATE held the GIL throughout:
1.8 s for 2 GiB on the 2-core test machine)."""

from __future__ import annotations

import threading
import time
import uuid

from kvbm_shm.shm import Segment, unlink


def rss_shmem_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssShmem:"))


def test_creating_a_segment_prefaults_it_while_other_threads_run():
    name, size = f"kvbm-t{uuid.uuid4().hex[:10]}-prefault", 512 << 20
    gaps, done = [], threading.Event()

    def ticker():  # stands for the request loop: it needs the GIL every millisecond
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    thread = threading.Thread(target=ticker)
    before = rss_shmem_bytes()
    thread.start()
    t0 = time.perf_counter()
    seg = Segment.create(name, size)
    create_s = time.perf_counter() - t0
    done.set()
    thread.join()
    try:
        assert rss_shmem_bytes() - before >= size * 0.95  # every page is mapped in now
        assert max(gaps) < create_s / 2, (max(gaps), create_s)  # the other thread kept running
    finally:
        seg.close()
        unlink(name)
