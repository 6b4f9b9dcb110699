"""What /proc says about processes and the kvbm files they use. Linux; read-only; no signals.

- `pid_alive(pid)`: the process exists and is not a zombie.
- `maps_file(pid, path)`: whether `pid` has `path` mapped (True/False), or None when /proc does
  not tell us (another user's process). A coordinator keeps every pool of its instance mapped
  for its whole life, so "the pid in the pool header is alive and maps the pool" is the test of
  ownership that survives pid reuse.
- `flock_holder(path)`: the pid holding a flock on `path` (from /proc/locks), or None; a live
  coordinator holds its instance lock. Reading /proc/locks never takes or waits for a lock, so
  a tool that looks cannot make a starting coordinator fail.
- `mappers(paths)`: the pids that map each of `paths`, from one pass over /proc.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..runtime import pid_alive

__all__ = ["pid_alive", "maps_file", "flock_holder", "mappers"]

_PROC = Path("/proc")


def _mapped_paths(data: bytes) -> set[str]:
    """Paths of file mappings in the text of a /proc/PID/maps file."""
    out = set()
    for line in data.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(b"/"):
            out.add(fields[5].decode(errors="replace"))
    return out


def maps_file(pid: int, path: str | os.PathLike) -> bool | None:
    try:
        data = (_PROC / str(pid) / "maps").read_bytes()
    except FileNotFoundError:
        return False
    except (PermissionError, ProcessLookupError):
        return None
    return str(path) in _mapped_paths(data)


def flock_holder(path: str | os.PathLike) -> int | None:
    try:
        st = os.stat(path)
        table = (_PROC / "locks").read_text()
    except OSError:
        return None
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":  # "->" marks a waiter, not a holder
            continue
        try:
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == want:
                return int(fields[4])
        except ValueError:
            continue
    return None


def mappers(paths: list[str]) -> dict[str, list[int]]:
    """For each path, the (sorted) pids of this user's visible processes that map it."""
    wanted = set(paths)
    out: dict[str, list[int]] = {path: [] for path in paths}
    if not wanted:
        return out
    needle = os.path.commonprefix(sorted(wanted)).encode() or b"/"
    for entry in os.listdir(_PROC):
        if not entry.isdigit():
            continue
        try:
            data = (_PROC / entry / "maps").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle not in data:
            continue
        for path in _mapped_paths(data) & wanted:
            out[path].append(int(entry))
    for pids in out.values():
        pids.sort()
    return out
