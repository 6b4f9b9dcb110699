"""Every kvbm segment and runtime directory on this node, whose it is, and what is orphaned.

`scan(runtime_root)` returns a `NodeView`: one `SegmentInfo` per `/dev/shm/kvbm-*` file and one
`InstanceInfo` per instance seen (in a segment or as a runtime directory under `runtime_root`).
Nothing is written and no lock is taken: looking never disturbs a running or starting coordinator.

Segment kinds:
- `pool`: a G2 pool whose header checks out; instance, namespace and owner come from the header.
- `corrupt` / `unreadable`: named like a pool (`kvbm-<instance>-pool-<id>`, the coordinator's
  naming) but its header does not check out / it cannot be opened; `error` says why, the
  instance comes from the name.
- `foreign`: not ours to trust (`shm`: another user's file, a symbolic link, a FIFO, a file open
  to others); never opened for its contents, never counted as an instance's, never removed;
  `error` names its owner and mode, the instance (if any) comes from the name.
- `other`: any other `kvbm-` segment (another tier's, or not ours to interpret); left alone.

Liveness. A pool's owner is the coordinator pid in its header; it is alive when that process
lives and maps the segment (so a recycled pid does not count). An instance is live when a pool
owner of it is alive, or a process holds its runtime directory's lock. A pool or corrupt segment
is an orphan when its instance is not live; `orphan` is None for `other` and `foreign` segments.
What cannot be read (a runtime root or instance directory of another user) is listed in
`NodeView.unreadable` with the reason, instead of failing the scan.
`instance_segments(instance)` lists the segment names that belong to one instance exactly (an
instance named `a` does not claim `kvbm-a-b-pool-0`, which is instance `a-b`'s).
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from .. import names, runtime
from ..config import check_instance
from .. import ownership
from ..errors import ConfigError, ForeignError, KvbmError
from ..layout import Namespace
from ..shm import HEADER_BYTES, POOL_MAGIC, SHM_DIR, PoolSegment, list_segments
from . import procfs

_RUNTIME_FILES = (*names.RUNTIME_FILES, names.CONTROL_SOCKET, names.EVENTS_SOCKET)  # any of them: a runtime dir


class SegmentInfo(msgspec.Struct, kw_only=True):
    name: str
    kind: str  # "pool", "corrupt", "unreadable", "foreign" or "other"
    size_bytes: int
    uid: int
    user: str  # the owner's user name
    instance: str | None = None
    pool_id: int | None = None
    model: str | None = None
    fingerprint: str | None = None
    num_blocks: int | None = None
    block_bytes: int | None = None
    owner_pid: int | None = None  # coordinator pid in the pool header
    owner_alive: bool | None = None
    orphan: bool | None = None
    mapped_by: list[int] = []  # pids that have it mapped (the owner and attached clients)
    error: str | None = None  # why it is corrupt, unreadable or foreign (names the segment and its owner)


class InstanceInfo(msgspec.Struct, kw_only=True):
    instance: str
    alive: bool
    pid: int | None  # the live coordinator, else the last one known (runtime file or pool header)
    runtime_dir: str | None  # None when no runtime directory of it is under the runtime root
    endpoint: str | None
    cluster: str  # "NODE@etcd://..." when its coordinator joined a cluster, else ""
    segments: int
    segment_bytes: int


class Unreadable(msgspec.Struct):
    path: str
    reason: str  # the error, and whose the path is


class NodeView(msgspec.Struct):
    runtime_root: str
    segments: list[SegmentInfo]
    instances: list[InstanceInfo]
    unreadable: list[Unreadable] = []  # what could not be read (another user's directories)


def segment_path(name: str) -> str:
    return str(SHM_DIR / name)


def read_segment(name: str) -> SegmentInfo:
    """What the segment's name and header say (no liveness); raises FileNotFoundError if gone."""
    st = os.lstat(SHM_DIR / name)
    info = SegmentInfo(name=name, kind="other", size_bytes=st.st_size, uid=st.st_uid,
                       user=ownership.user_name(st.st_uid))
    named = names.parse_pool_name(name)
    try:
        seg = PoolSegment.attach(name, writable=False, populate=False)
    except FileNotFoundError:
        raise
    except ForeignError as e:
        info.kind, info.error = "foreign", str(e)
        if named:
            info.instance, info.pool_id = named
        return info
    except (KvbmError, OSError) as e:
        if named:
            info.kind = "unreadable" if isinstance(e, OSError) else "corrupt"
            info.error = f"segment {name}: cannot open: {e.strerror or e}" if isinstance(e, OSError) else str(e)
            if st.st_size >= HEADER_BYTES and _blank_header(name):
                info.error = (f"segment {name}: header not written yet "
                              "(the pool is being created, or its creator died first)")
            info.instance, info.pool_id = named
        return info
    try:
        _fill_from_header(info, seg)
    finally:
        seg.close()
    return info


def _blank_header(name: str) -> bool:
    """Whether the magic is still zeros: `PoolSegment.create` writes it last."""
    try:
        fd = os.open(SHM_DIR / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.pread(fd, len(POOL_MAGIC), 0) == bytes(len(POOL_MAGIC))
    except OSError:
        return False
    finally:
        os.close(fd)


def _fill_from_header(info: SegmentInfo, seg: PoolSegment) -> None:
    h = seg.header
    info.kind = "pool"
    info.instance = bytes(h["instance"]).decode(errors="replace")
    info.pool_id = int(h["pool_id"])
    info.fingerprint = seg.fingerprint
    info.num_blocks, info.block_bytes = seg.num_blocks, seg.block_bytes
    info.owner_pid = int(h["coordinator_pid"])
    try:
        info.model = msgspec.msgpack.decode(seg.namespace_bytes, type=Namespace).model
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        info.kind, info.error = "corrupt", f"segment {seg.name}: namespace in the header does not decode: {e}"


def owner_alive(info: SegmentInfo) -> bool:
    """The pool's header pid lives and maps the segment (True when /proc cannot tell us)."""
    if not info.owner_pid or not procfs.pid_alive(info.owner_pid):
        return False
    return procfs.maps_file(info.owner_pid, segment_path(info.name)) is not False


def runtime_dirs(runtime_root: Path, unreadable: list[Unreadable] | None = None) -> dict[str, Path]:
    """Instance directories under the runtime root (those holding any runtime file). What cannot
    be read is described in `unreadable` (when given) and skipped."""
    try:
        entries = sorted(os.listdir(runtime_root))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as e:
        _cannot_read(unreadable, runtime_root, e)
        return {}
    out = {}
    for entry in entries:
        path = Path(runtime_root) / entry
        try:
            check_instance(entry)
        except ConfigError:
            continue
        try:
            if path.is_dir() and any(os.path.lexists(path / f) for f in _RUNTIME_FILES):
                os.listdir(path)
                out[entry] = path
        except OSError as e:
            _cannot_read(unreadable, path, e)
    return out


def _cannot_read(unreadable: list[Unreadable] | None, path: Path, e: OSError) -> None:
    if unreadable is None:
        return
    try:
        whose = f" ({ownership.describe(os.lstat(path))})"
    except OSError:
        whose = ""
    unreadable.append(Unreadable(str(path), f"{e.strerror}{whose}"))


def lock_holder(instance_dir: Path) -> int | None:
    """The pid holding the instance lock: the live coordinator (or a `gc` cleaning it)."""
    return procfs.flock_holder(Path(instance_dir) / names.LOCK_FILE)


def instance_segments(instance: str) -> list[str]:
    """Names of the segments that belong to `instance` (header first, pool name as fallback)."""
    out = []
    for name in list_segments(names.instance_prefix(instance)):
        try:
            info = read_segment(name)
        except FileNotFoundError:
            continue
        if info.instance == instance and info.kind != "foreign":
            out.append(name)
    return out


def scan(runtime_root: Path, with_mappers: bool = True) -> NodeView:
    segments = []
    for name in list_segments():
        try:
            segments.append(read_segment(name))
        except FileNotFoundError:  # removed while we looked
            continue
    if with_mappers:
        found = procfs.mappers([segment_path(s.name) for s in segments])
        for s in segments:
            s.mapped_by = found[segment_path(s.name)]
    live_pid: dict[str, int] = {}
    last_pid: dict[str, int] = {}
    for s in segments:
        if s.kind == "pool":
            s.owner_alive = owner_alive(s)
            last_pid.setdefault(s.instance, s.owner_pid)
            if s.owner_alive:
                live_pid[s.instance] = s.owner_pid
    unreadable: list[Unreadable] = []
    dirs = runtime_dirs(runtime_root, unreadable)
    endpoints, clusters = {}, {}
    for name, path in dirs.items():
        holder = lock_holder(path)
        if holder is not None:
            live_pid.setdefault(name, holder)
        try:
            info = runtime.read_info(path)
        except ConfigError:
            info = None
        except OSError as e:
            _cannot_read(unreadable, path / names.INFO_FILE, e)
            info = None
        if info is not None:
            last_pid[name] = info.pid
            endpoints[name] = info.endpoint
            clusters[name] = info.cluster
    owned = [s for s in segments if s.instance is not None and s.kind != "foreign"]
    for s in owned:
        s.orphan = s.instance not in live_pid
    instances = []
    for name in sorted({s.instance for s in owned} | set(dirs)):
        mine = [s for s in owned if s.instance == name]
        instances.append(InstanceInfo(
            instance=name, alive=name in live_pid, pid=live_pid.get(name, last_pid.get(name)),
            runtime_dir=str(dirs[name]) if name in dirs else None, endpoint=endpoints.get(name),
            cluster=clusters.get(name, ""),
            segments=len(mine), segment_bytes=sum(s.size_bytes for s in mine)))
    return NodeView(str(runtime_root), segments, instances, unreadable)
