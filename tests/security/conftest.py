"""Fixtures of the security suite: another local user, for the cases where one user attacks another.

`other_user` creates an unprivileged system user for the test module (no home, no login shell)
and removes it afterwards. Its `call(fn, *args)` runs `fn` in a forked child of this process that
has dropped to that user (so the interpreter and the modules imported here need not be readable
by it: import what the child uses before calling), and returns `fn`'s result or raises with the
child's traceback; `spawn(fn, *args)` starts such a child and returns at once (`kill()` ends it).
The cases are skipped, with the reason printed, only where no user can be created (not root, or
no `useradd`).
"""

from __future__ import annotations

import os
import pickle
import pwd
import select
import shutil
import signal
import subprocess
import time
import traceback
import uuid

import pytest


class ForkedChild:
    """A forked child running `fn(*args)` as another user; its result comes back pickled."""

    def __init__(self, uid: int, gid: int, fn, args: tuple, kwargs: dict):
        self._read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into the test process's code
            status = 0
            try:
                os.close(self._read)
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                result = ("ok", fn(*args, **kwargs))
            except BaseException:
                result = ("error", traceback.format_exc())
                status = 1
            try:
                data = pickle.dumps(result)
                view = memoryview(data)
                while view:
                    view = view[os.write(write, view):]
            finally:
                os._exit(status)
        os.close(write)
        self.name = getattr(fn, "__name__", str(fn))

    def result(self, timeout_s: float = 60):
        chunks, deadline = [], time.monotonic() + timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._read], [], [], left)[0]:
                    raise AssertionError(f"child {self.name} did not finish within {timeout_s} s")
                chunk = os.read(self._read, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(self._read)
            self.kill()
        if not chunks:
            raise AssertionError(f"child {self.name} died without a result")
        status, value = pickle.loads(b"".join(chunks))
        if status == "error":
            raise AssertionError(f"child {self.name} failed as the other user:\n{value}")
        return value

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


class OtherUser:
    def __init__(self, name: str):
        entry = pwd.getpwnam(name)
        self.name, self.uid, self.gid = name, entry.pw_uid, entry.pw_gid

    def spawn(self, fn, *args, **kwargs) -> ForkedChild:
        return ForkedChild(self.uid, self.gid, fn, args, kwargs)

    def call(self, fn, *args, timeout_s: float = 60, **kwargs):
        return self.spawn(fn, *args, **kwargs).result(timeout_s)


@pytest.fixture(scope="module")
def other_user():
    useradd = shutil.which("useradd")
    if os.geteuid() != 0 or useradd is None:
        reason = ("other-user cases need root to create a user" if os.geteuid() != 0
                  else "other-user cases need useradd, which is not installed")
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    name = f"kvbmt{uuid.uuid4().hex[:10]}"
    made = subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                          capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        reason = f"cannot create a user for the other-user cases: {made.stderr.strip()}"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    try:
        yield OtherUser(name)
    finally:
        subprocess.run([shutil.which("userdel") or "userdel", name], capture_output=True, timeout=30)
