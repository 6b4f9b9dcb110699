"""Removing what dead instances left on the node: pool segments, sockets, runtime files.

`collect(runtime_root, dry_run=False, instances=None) -> GcReport` lists what was removed and what
was kept, and why; `instances` limits it to those instance names (default: every instance).

Rules:
- Only an instance with no live coordinator is touched. For each instance seen (in a segment, or
  as a runtime directory under `runtime_root`), the instance lock is taken (`runtime.claim`)
  before anything is removed and held while cleaning, so a coordinator starting meanwhile cannot
  adopt a segment that is being removed (it finds the lock taken and exits with ALREADY_RUNNING;
  start it again). A lock already held means a live coordinator: the instance is kept whole.
- Under the lock every segment is checked once more: one whose header pid is alive and maps it
  (a coordinator of the same instance name running under another runtime directory) is kept.
- Removed: the instance's pool segments (corrupt ones included), and in its runtime directory
  the runtime file, socket files and lock file, then the directory if nothing else is in it.
  A segment still mapped by a client is unlinked all the same (its memory is returned when the
  last process unmaps it); `mapped_by` says who still holds it.
- Never touched: segments that are not pools (`other`: not ours to interpret), another user's
  segments and anything else not ours to trust (`foreign`: links, FIFOs, files open to others),
  anything of a live instance, files of a runtime directory that are not ours, and a runtime
  directory that is not ours to trust (`runtime.prepare_dir` refuses it). What cannot be read
  (another user's runtime directory) is reported as kept, with the reason.
- `dry_run` takes no lock and changes nothing: it reports what a run would do, judging liveness
  the read-only way (`node.scan`).
Run it with the runtime directory the coordinators use (`--runtime-dir` / `KVBM_RUNTIME_DIR`).
"""

from __future__ import annotations

import logging
import os
import stat
from collections import defaultdict
from pathlib import Path

import msgspec

from .. import names, runtime, shm
from ..errors import ErrorCode, ForeignError, KvbmError
from . import node

log = logging.getLogger(__name__)

_RUNTIME_FILES = (names.INFO_FILE, names.INFO_TMP_FILE, names.CONTROL_SOCKET, names.EVENTS_SOCKET)  # the lock goes last


class Removed(msgspec.Struct):
    path: str
    instance: str
    what: str  # "segment", "runtime file" or "runtime dir"
    size_bytes: int = 0
    mapped_by: list[int] = []


class Kept(msgspec.Struct):
    path: str
    instance: str | None
    reason: str


class GcReport(msgspec.Struct):
    dry_run: bool
    removed: list[Removed]
    kept: list[Kept]


def collect(runtime_root: Path, dry_run: bool = False, instances: list[str] | None = None) -> GcReport:
    view = node.scan(runtime_root)
    report = GcReport(dry_run, [], [])
    uid = os.getuid()
    segments: dict[str, list[node.SegmentInfo]] = defaultdict(list)
    for s in view.segments:
        if instances is not None and s.instance not in instances:
            continue
        if s.kind == "foreign" or s.uid != uid:
            report.kept.append(Kept(node.segment_path(s.name), s.instance,
                                    f"not ours: {s.error or f'belongs to uid {s.uid} ({s.user})'}"))
        elif s.instance is None:
            report.kept.append(Kept(node.segment_path(s.name), None, "not a kvbm pool segment: left to its owner"))
        else:
            segments[s.instance].append(s)
    report.kept.extend(Kept(u.path, None, f"cannot read it: {u.reason}") for u in view.unreadable)
    dirs = {name: path for name, path in node.runtime_dirs(runtime_root).items()
            if instances is None or name in instances}
    live = {i.instance: i.pid for i in view.instances if i.alive}
    for instance in sorted(set(segments) | set(dirs)):
        instance_dir = Path(runtime_root) / instance
        if instance in live:
            _keep_all(report, instance, segments[instance], dirs.get(instance),
                      f"instance is live (coordinator pid {live[instance]})")
        elif dry_run:
            report.removed.extend(_segment_removal(s) for s in segments[instance])
            if instance in dirs:
                report.removed.extend(_runtime_removals(instance, instance_dir, dry_run=True))
        else:
            _clean(report, instance, instance_dir, {s.name: s for s in segments[instance]})
    return report


def _keep_all(report: GcReport, instance: str, segments: list[node.SegmentInfo], instance_dir: Path | None,
              reason: str) -> None:
    report.kept.extend(Kept(node.segment_path(s.name), instance, reason) for s in segments)
    if instance_dir is not None:
        report.kept.append(Kept(str(instance_dir), instance, reason))


def _clean(report: GcReport, instance: str, instance_dir: Path, seen: dict[str, node.SegmentInfo]) -> None:
    """Remove a dead instance's leftovers while holding its lock."""
    had_dir = instance_dir.exists()
    try:
        runtime.prepare_dir(instance_dir)
        lock_fd = runtime.claim(instance_dir)
    except KvbmError as e:
        reason = "a coordinator just started" if e.code == ErrorCode.ALREADY_RUNNING else str(e)
        _keep_all(report, instance, list(seen.values()), instance_dir if had_dir else None, reason)
        return
    try:
        for name in node.instance_segments(instance):
            try:
                info = node.read_segment(name)
            except FileNotFoundError:
                continue
            if info.uid != os.getuid():
                continue  # reported as kept already
            if info.kind == "pool" and node.owner_alive(info):
                report.kept.append(Kept(node.segment_path(name), instance,
                                        f"mapped by its live coordinator pid {info.owner_pid} "
                                        "(running under another runtime directory?)"))
                continue
            info.mapped_by = seen[name].mapped_by if name in seen else []
            try:
                if not shm.unlink(name):
                    continue
            except ForeignError:
                continue  # swapped for a file that is not ours since the scan: left alone
            report.removed.append(_segment_removal(info))
            log.info("removed segment %s of dead instance %s", name, instance)
        if had_dir:
            report.removed.extend(_runtime_removals(instance, instance_dir, dry_run=False))
        else:  # we made the directory only to hold the lock
            os.unlink(instance_dir / names.LOCK_FILE)
    finally:
        os.close(lock_fd)
    try:
        instance_dir.rmdir()
        if had_dir:
            report.removed.append(Removed(str(instance_dir), instance, "runtime dir"))
    except OSError:
        report.kept.append(Kept(str(instance_dir), instance, "holds files that are not kvbm runtime files"))


def _segment_removal(info: node.SegmentInfo) -> Removed:
    return Removed(node.segment_path(info.name), info.instance, "segment", info.size_bytes, info.mapped_by)


def _runtime_removals(instance: str, instance_dir: Path, dry_run: bool) -> list[Removed]:
    """The runtime file, socket files and (last) the lock file of a dead instance's directory."""
    found = [n for n in sorted(os.listdir(instance_dir))
             if n in _RUNTIME_FILES or stat.S_ISSOCK(os.lstat(instance_dir / n).st_mode)]
    if (instance_dir / names.LOCK_FILE).exists():
        found.append(names.LOCK_FILE)
    removed = []
    for name in found:
        path = instance_dir / name
        if not dry_run:
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
        removed.append(Removed(str(path), instance, "runtime file"))
    if dry_run:
        removed.append(Removed(str(instance_dir), instance, "runtime dir"))
    return removed
