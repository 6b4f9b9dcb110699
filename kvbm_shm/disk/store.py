"""The G3 directory of one instance, in the coordinator: its locks, its block files, the budget.

Runs in the coordinator process (start-up and pool creation; no I/O on the hot path).

- `G3Store(config)`: `<disk_dir>/<instance>`, created 0700; a --disk-dir that is missing (other
  than the default, which is created) or not writable fails with `ConfigError`. Takes `g3.lock`
  (one coordinator per directory) and waits, for a while, until the I/O workers of a coordinator
  that crashed have finished their last job (they hold `g3-io.lock` shared: `io_lock_path`). Then
  opens every G3 file of this format (other versions are left alone, unusable ones removed), fits
  them into `disk_cache_gb` most recently used first (a file keeps, grows or shrinks to
  `budget // tp_size` or what is left, or is removed), and rebuilds each file's index from its
  slot headers (`G3Index.recover`).
- `index_for(namespace, in_use)`: the namespace's index, creating its file when there is none:
  pre-allocated, or sparse (with a warning) when the filesystem has less room; files of
  namespaces not in `in_use` are removed, oldest first, when the budget has no room left.
- `indexes` (by fingerprint), `close()`: fsync and close every file, release the lock.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from pathlib import Path

import msgspec

from .. import ownership
from ..config import ServiceConfig, default_disk_dir
from ..errors import ConfigError, CorruptionError, ForeignError, KvbmError
from ..layout import Namespace
from ..names import G3_IO_LOCK_FILE, G3_LOCK_FILE, G3_PARTIAL_SUFFIX, G3_SUFFIX, parse_g3_file_name
from . import format as g3
from .index import G3Index

log = logging.getLogger(__name__)

_OLD_WORKERS_WAIT_S = 10.0


def open_disk_dir(config: ServiceConfig) -> Path:
    """`<disk_dir>/<instance>`, created 0700. ConfigError when disk_dir is missing or unwritable, and
    ForeignError when that directory is not ours alone (another user's, a link, writable by others,
    or under a directory another user could replace it in): nobody else may put block files there."""
    base = Path(config.disk_dir)
    if not base.is_dir():
        if base.exists() or base != default_disk_dir():
            raise ConfigError(f"disk_dir {base} does not exist or is not a directory: create it, or point "
                              "--disk-dir (KVBM_DISK_DIR) at a directory on local disk")
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = base / config.instance
    try:
        if not os.access(base, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        path.mkdir(mode=0o700, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"disk_dir {base} is not writable (uid {os.getuid()}): {e.strerror}") from e
    advice = "point --disk-dir (KVBM_DISK_DIR) at a directory of your own"
    ownership.check_ancestors(path, "disk directory")
    ownership.check_dir(path, "disk directory", advice)
    return path


class G3Store:
    def __init__(self, config: ServiceConfig):
        self._config = config
        self.dir = open_disk_dir(config)
        self._lock_fd = self._claim()
        self.io_lock_path = self.dir / G3_IO_LOCK_FILE
        try:
            self._wait_for_old_workers()
            self.indexes: dict[str, G3Index] = {}  # by namespace fingerprint, used by a pool or not
            self._open_files()
        except BaseException:
            os.close(self._lock_fd)
            raise

    def index_for(self, ns: Namespace, in_use: set[str]) -> G3Index | None:
        return self.indexes.get(ns.fingerprint) or self._create(ns, in_use)

    def close(self) -> None:
        """Flush and close the files (the cache stays on disk for the next start)."""
        for index in self.indexes.values():
            try:
                index.file.sync()
            except OSError as e:
                log.warning("fsync %s: %s", index.path, e)
            index.file.close()
        self.indexes.clear()
        os.close(self._lock_fd)

    def _claim(self) -> int:
        fd = os.open(self.dir / G3_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"disk_dir {self.dir} is in use by another coordinator of instance "
                              f"{self._config.instance!r}; give each its own --disk-dir") from None
        return fd

    def _wait_for_old_workers(self) -> None:
        fd = os.open(self.io_lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + _OLD_WORKERS_WAIT_S
            warned = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        log.warning("I/O workers of a previous coordinator still hold %s; going on", self.io_lock_path)
                        break
                    if not warned:
                        log.info("waiting for the I/O workers of a previous coordinator to finish their last job")
                        warned = True
                    time.sleep(0.05)
        finally:
            os.close(fd)

    def _open_files(self) -> None:
        found = []
        for name in sorted(os.listdir(self.dir)):
            path = self.dir / name
            if name.endswith(G3_SUFFIX + G3_PARTIAL_SUFFIX):  # a creation that never finished
                path.unlink(missing_ok=True)
                continue
            parsed = parse_g3_file_name(name)
            if parsed is None:
                continue
            version, fp = parsed
            if version != g3.FORMAT_VERSION:
                log.info("ignoring %s: G3 format %d, this build uses %d", path, version, g3.FORMAT_VERSION)
                continue
            try:
                f = g3.BlockFile.open(path)
                ns = msgspec.msgpack.decode(f.namespace, type=Namespace)
                if f.fingerprint != fp or ns.fingerprint != fp:
                    f.close()
                    raise CorruptionError("its header names another namespace")
            except ForeignError as e:  # not ours: never read, never removed
                log.warning("leaving %s alone: %s", path, e)
                continue
            except (KvbmError, OSError, msgspec.MsgspecError) as e:
                log.warning("removing unusable G3 file %s: %s", path, e)
                path.unlink(missing_ok=True)
                continue
            found.append((path.stat().st_mtime, f, ns))
        used = 0
        for _, f, ns in sorted(found, key=lambda t: t[0], reverse=True):
            want = self._slots_for(ns, used)
            if want < 1:
                log.warning("removing G3 file %s: it does not fit into disk_cache_gb=%g", f.path,
                            self._config.disk_cache_gb)
                f.close()
                f.path.unlink(missing_ok=True)
                continue
            if want != f.num_slots:
                log.info("resizing G3 file %s from %d to %d slots to fit disk_cache_gb=%g", f.path, f.num_slots,
                         want, self._config.disk_cache_gb)
                self._warn_if_sparse(f, f.resize(want))
            index = G3Index(f)
            t0 = time.monotonic()
            n = index.recover()
            log.info("G3 file %s (%s): %d blocks found in %d slots in %.2f s", f.path, ns.model, n, f.num_slots,
                     time.monotonic() - t0)
            self.indexes[ns.fingerprint] = index
            used += f.size_bytes()

    def _create(self, ns: Namespace, in_use: set[str]) -> G3Index | None:
        want = self._slots_for(ns, self._used_bytes())
        idle = sorted((fp for fp in self.indexes if fp not in in_use),
                      key=lambda fp: self.indexes[fp].file.path.stat().st_mtime)
        while want < 1 and idle:
            index = self.indexes.pop(idle.pop(0))
            log.info("removing G3 file %s (no pool uses it) to make room for %s", index.path, ns.model)
            index.file.close()
            index.file.path.unlink(missing_ok=True)
            want = self._slots_for(ns, self._used_bytes())
        if want < 1:
            log.warning("no G3 for %s: disk_cache_gb=%g is taken by other namespaces", ns.model,
                        self._config.disk_cache_gb)
            return None
        path = self.dir / g3.file_name(ns.fingerprint)
        if path.is_symlink() or path.exists():  # only a file we could not open (foreign) is left there
            log.warning("no G3 for %s: %s is there and not ours; it is left alone", ns.model, path)
            return None
        try:
            f, allocated = g3.BlockFile.create(path, fingerprint=ns.fingerprint, namespace=msgspec.msgpack.encode(ns),
                                               block_bytes=ns.kv.block_bytes, num_slots=want)
        except OSError as e:
            log.error("no G3 for %s: cannot create %s: %s", ns.model, path, e)
            return None
        self._warn_if_sparse(f, allocated)
        log.info("created G3 file %s for %s: %d slots of %d bytes (%.1f MiB)", path, ns.model, want,
                 f.slot_bytes, f.size_bytes() / 2**20)
        index = self.indexes[ns.fingerprint] = G3Index(f)
        return index

    def _slots_for(self, ns: Namespace, used_bytes: int) -> int:
        budget = self._config.disk_cache_bytes
        return g3.slots_for(min(budget // ns.tp_size, budget - used_bytes), ns.kv.block_bytes)

    def _used_bytes(self) -> int:
        return sum(index.file.size_bytes() for index in self.indexes.values())

    @staticmethod
    def _warn_if_sparse(f: g3.BlockFile, allocated: bool) -> None:
        if not allocated:
            free = os.statvfs(f.path.parent)
            log.warning("the filesystem of %s has %.1f MiB free, less than the %.1f MiB asked: the G3 file is "
                        "sparse, and writes to slots the disk cannot hold fail with ENOSPC (counted as "
                        "no_space_blocks; those blocks stay in G2)", f.path, free.f_bavail * free.f_frsize / 2**20,
                        f.size_bytes() / 2**20)
