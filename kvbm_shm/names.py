"""Every name kvbm-shm gives a file: shared-memory segments, runtime-directory files, G3 files.

The one place these names are built and parsed; everything that creates, finds, lists or removes
one of them asks here. Names carry the instance, so instances never meet:

    /dev/shm/kvbm-<instance>-pool-<pool_id>         a G2 pool segment (`pool_name`)
    /dev/shm/kvbm-<instance>-dev-<pid>-<n>          a CPU stand-in of an engine's device KV (`standin_name`)
    <runtime_dir>/<instance>/control.sock           the coordinator's ROUTER (ipc://)
                             events.sock            its PUB socket for KV events
                             workers-<kind>.sock    its ROUTER per worker kind (`worker_socket`)
                             runtime.json           RuntimeInfo (written through runtime.json.tmp)
                             coordinator.lock       flock held while a coordinator lives
    <disk_dir>/<instance>/g3-v<N>-<fingerprint>.blocks   a G3 block file (`g3_file_name`;
                                                          `.new` while it is being created)
                          g3.lock, g3-io.lock             the G3 directory's locks

An instance name never contains "/" (`config.check_instance`), so `kvbm-<instance>-` prefixes
one instance's segments; instance `a` still must not claim `kvbm-a-b-pool-0` (instance `a-b`'s),
which is why pool names are parsed whole (`parse_pool_name`), never matched by prefix alone.
This module imports nothing: the workers, the tools and the coordinator all use it.
"""

from __future__ import annotations

import re

SEGMENT_PREFIX = "kvbm-"  # every segment of ours starts so; nothing else is touched

# ---------------------------------------------------------------- shared-memory segments

_POOL_NAME = re.compile(r"^kvbm-(?P<instance>[A-Za-z0-9_.-]{1,48})-pool-(?P<pool_id>\d+)$")
_STANDIN_NAME = re.compile(r"^kvbm-(?P<instance>[A-Za-z0-9_.-]{1,48})-dev-(?P<pid>\d+)-(?P<n>\d+)$")


def instance_prefix(instance: str) -> str:
    """What every segment name of `instance` starts with (segments of an instance `<instance>-x` too)."""
    return f"{SEGMENT_PREFIX}{instance}-"


def pool_prefix(instance: str) -> str:
    return f"{instance_prefix(instance)}pool-"


def pool_name(instance: str, pool_id: int) -> str:
    """The segment name of pool `pool_id` of `instance`."""
    return f"{pool_prefix(instance)}{pool_id}"


def parse_pool_name(name: str) -> tuple[str, int] | None:
    """(instance, pool id) of a pool segment name, or None for any other name."""
    m = _POOL_NAME.match(name)
    return (m["instance"], int(m["pool_id"])) if m else None


def standin_prefix(instance: str) -> str:
    return f"{instance_prefix(instance)}dev-"


def standin_name(instance: str, pid: int, n: int) -> str:
    """The segment name of stand-in `n` created by process `pid`."""
    return f"{standin_prefix(instance)}{pid}-{n}"


def parse_standin_name(name: str) -> tuple[str, int] | None:
    """(instance, creator pid) of a stand-in segment name, or None for any other name."""
    m = _STANDIN_NAME.match(name)
    return (m["instance"], int(m["pid"])) if m else None


# ---------------------------------------------------------------- runtime directory files

CONTROL_SOCKET = "control.sock"
EVENTS_SOCKET = "events.sock"
INFO_FILE = "runtime.json"
INFO_TMP_FILE = INFO_FILE + ".tmp"
LOCK_FILE = "coordinator.lock"


def worker_socket(kind: str) -> str:
    """The socket of the coordinator's ROUTER for workers of `kind` ("transfer", "disk")."""
    return f"workers-{kind}.sock"


LONGEST_SOCKET_NAME = worker_socket("transfer")  # the longest socket name in an instance directory
RUNTIME_FILES = (INFO_FILE, INFO_TMP_FILE, LOCK_FILE)  # besides sockets: what a coordinator leaves there

# ---------------------------------------------------------------- G3 directory files

G3_SUFFIX = ".blocks"
G3_PARTIAL_SUFFIX = ".new"  # a block file being created; renamed when complete
G3_LOCK_FILE = "g3.lock"
G3_IO_LOCK_FILE = "g3-io.lock"


def g3_file_name(fingerprint: str, version: int) -> str:
    """The block file of namespace `fingerprint` in G3 format `version`."""
    return f"g3-v{version}-{fingerprint}{G3_SUFFIX}"


def parse_g3_file_name(name: str) -> tuple[int, str] | None:
    """(format version, fingerprint) of a G3 file name, or None for any other file."""
    if not (name.startswith("g3-v") and name.endswith(G3_SUFFIX)):
        return None
    version, _, fingerprint = name[4:-len(G3_SUFFIX)].partition("-")
    if not version.isdigit() or len(fingerprint) != 32:
        return None
    return int(version), fingerprint
