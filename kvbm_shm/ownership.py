"""Whether a file or directory is ours to trust: the owner and mode rules of segments and runtime dirs.

A process trusts only what its own uid made and nobody else can change. Each check raises
`ForeignError` naming the path, what it is, its owner (uid and user name) and its mode:
- `check_file(path, st)`: a shm segment or runtime file, from `fstat` of the opened descriptor
  (opened with O_NOFOLLOW): a regular file (never a link, FIFO or device) owned by our uid with
  no group or other permission bits (0600).
- `check_dir(path, what)`: a runtime root or instance directory, or a disk tier directory, from
  `lstat`: a real directory (not a symbolic link) owned by our uid and writable by nobody else.
- `check_ancestors(path, what)`: every directory above one of those (symbolic links resolved) is owned
  by root or by us and is writable by nobody else unless it is sticky (like /tmp), so nobody else
  can rename the root away and put their own in its place.
- `describe(st)`: "a directory owned by uid 1001 (alice), mode 0777", for messages.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from .errors import ForeignError

_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "no such user"


def describe(st: os.stat_result) -> str:
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "an unknown kind of file")
    return f"{kind} owned by uid {st.st_uid} ({user_name(st.st_uid)}), mode {stat.S_IMODE(st.st_mode):04o}"


def _me() -> str:
    uid = os.getuid()
    return f"uid {uid} ({user_name(uid)})"


def check_file(path: str | os.PathLike, st: os.stat_result) -> None:
    """A regular file of our uid, mode 0600 or narrower; else ForeignError."""
    if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid()
            or stat.S_IMODE(st.st_mode) & (stat.S_IRWXG | stat.S_IRWXO)):
        raise ForeignError(f"{path} is not ours to use: it is {describe(st)}; kvbm-shm uses only regular files "
                           f"owned by {_me()} with mode 0600")


RUNTIME_ADVICE = "choose another runtime directory: --runtime-dir, KVBM_RUNTIME_DIR or $XDG_RUNTIME_DIR"


def check_dir(path: str | os.PathLike, what: str = "runtime directory",
              advice: str = RUNTIME_ADVICE) -> os.stat_result:
    """A real directory of our uid that nobody else can write (lstat); FileNotFoundError if missing."""
    st = os.lstat(path)
    if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid()
            or stat.S_IMODE(st.st_mode) & (stat.S_IWGRP | stat.S_IWOTH)):
        raise ForeignError(f"{what} {path} is not ours to trust: it is {describe(st)}; it must be "
                           f"a directory (not a symbolic link) owned by {_me()} that no one else can write "
                           f"(remove it, or {advice})")
    return st


def check_ancestors(path: str | os.PathLike, what: str = "runtime directory") -> None:
    """Every directory above `path` is root's or ours and not open to others unless sticky."""
    me = os.getuid()
    real = Path(os.path.realpath(Path(path).parent))
    for d in [*reversed(real.parents), real]:
        st = os.lstat(d)
        loose = stat.S_IMODE(st.st_mode) & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX
        if st.st_uid not in (0, me) or loose:
            raise ForeignError(f"runtime directory {path} lies under {d}, {describe(st)}: another user could "
                               "replace it; choose a runtime directory under one that only root or you can write")
