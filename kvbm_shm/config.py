"""Configuration: frozen objects, and the one place that reads `KVBM_*` environment variables.

`ServiceConfig` configures a coordinator (`kvbm-shm serve`); `ClientConfig` tells a client or a
tool where to find one. Values come, lowest precedence first, from the embedded defaults below,
a TOML file (`--config` or `KVBM_CONFIG`), `KVBM_<FIELD>` environment variables, and explicit
overrides (command-line flags). Unknown keys and malformed values raise `ConfigError` naming the
option: every number must be finite and in its range, an integer option takes only integral
values, a path holds no NUL, an instance name is 1-48 characters of [A-Za-z0-9_.-] not starting
with a dot, and the runtime directory must leave room for its socket paths (`runtime`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Mapping

from . import runtime
from .errors import ConfigError

_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,48}$")
_NODE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HOSTPORT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,253}:[0-9]{1,5}$")
_ADDRESS_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,253}$")
_DAY_MS = 86_400_000  # longest lease and deadline
_MAX_WORKERS = 1024  # most worker processes or threads of one kind


def default_runtime_root() -> Path:
    """Where per-instance runtime directories live: $XDG_RUNTIME_DIR/kvbm-shm or /tmp/kvbm-shm-UID."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "kvbm-shm"
    return Path(f"/tmp/kvbm-shm-{os.getuid()}")


def default_disk_dir() -> Path:
    """Default G3 directory: $XDG_CACHE_HOME/kvbm-shm or ~/.cache/kvbm-shm."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvbm-shm"


def check_instance(name: str) -> str:
    if not isinstance(name, str) or not _INSTANCE_RE.match(name) or name.startswith("."):
        raise ConfigError(f"instance name {name!r} must be 1-48 characters of [A-Za-z0-9_.-] "
                          "and must not start with '.'")
    return name


def _check_values(config: Any) -> None:
    """Every field holds a value of its kind: integers integral, numbers finite, paths without NUL."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{field.name} must be an integer, got {value!r}")
        if field.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
            raise ConfigError(f"{field.name} must be a finite number, got {value!r}")
        if field.type == "Path" and "\0" in str(value):
            raise ConfigError(f"{field.name} must be a path without NUL characters, got {str(value)!r}")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """Everything a coordinator needs. The defaults are the embedded default configuration."""

    instance: str = "default"
    runtime_dir: Path = dataclasses.field(default_factory=default_runtime_root)
    cpu_cache_gb: float = 2.0  # G2 budget shared by all pools of this instance
    lease_ms: int = 5000  # a client silent this long loses its pins and unfinished blocks
    max_leases: int = 4096  # open client leases in all; a hello past it gets CAPACITY
    max_leases_per_process: int = 64  # open leases of one client pid; a hello past it gets CAPACITY
    max_pools: int = 64  # pools (namespaces) of this instance; registering one more gets CAPACITY
    log_level: str = "INFO"
    max_frame_bytes: int = 64 << 20  # larger requests get FRAME_TOO_LARGE
    disk_cache_gb: float = 0.0  # G3 budget; 0 turns the disk tier off
    disk_dir: Path = dataclasses.field(default_factory=default_disk_dir)
    metrics_port: int = 0  # Prometheus endpoint; 0 turns it off
    metrics_host: str = "127.0.0.1"  # address the metrics endpoint binds; 0.0.0.0 exposes it to the network
    max_connections: int = 0  # control connections at once; 0: the open-file limit minus a reserve
    transfer_workers: int = 1  # G1 <-> G2 transfer worker processes; 0: only engine-driven copies
    disk_io_workers: int = 2  # NVMe I/O worker processes (with the disk tier on)
    disk_io_threads: int = 4  # blocks in flight per I/O worker
    disk_write_through: bool = False  # write every committed block to G3 at once (default: write-back)
    disk_admit_uses: int = 2  # recent uses (stores, hits) before write-back takes a block to G3; 1: all
    disk_low_watermark: float = 0.25  # write back when free+clean blocks fall under this share of a pool
    cluster: str = ""  # etcd://HOST:PORT[,HOST:PORT...]: join a cluster (G4); empty: this node stands alone
    node_name: str = ""  # this node's name in the cluster; empty: the host name
    advertise: str = "127.0.0.1"  # address the cluster endpoints bind and peers reach
    cluster_port: int = 0  # first of two TCP ports (control, events) for peers; 0: any free ones
    cluster_secret_file: str = ""  # file holding the cluster secret (CURVE keys derive from it); needed with cluster
    cluster_ttl_s: int = 5  # etcd lease of this node's key: a dead node leaves the cluster after this
    cluster_deadline_ms: int = 1000  # a remote fetch (pin, read, verify) that takes longer is a miss
    cluster_index_blocks: int = 1_000_000  # remote index entries kept at most (oldest dropped past it)

    def __post_init__(self) -> None:
        _check_values(self)
        check_instance(self.instance)
        runtime.check_socket_room(self.instance_dir)
        if self.cpu_cache_gb <= 0:
            raise ConfigError(f"cpu_cache_gb must be positive, got {self.cpu_cache_gb}")
        _check_range("lease_ms", self.lease_ms, 50, _DAY_MS)
        _check_range("max_frame_bytes", self.max_frame_bytes, 4096, 1 << 32)
        for name in ("max_leases", "max_leases_per_process", "max_pools"):
            _check_range(name, getattr(self, name), 1, 1 << 20)
        if self.disk_cache_gb < 0:
            raise ConfigError(f"disk_cache_gb must not be negative, got {self.disk_cache_gb}")
        _check_range("metrics_port", self.metrics_port, 0, 65535)
        _check_range("max_connections", self.max_connections, 0, 1 << 24)
        _check_range("transfer_workers", self.transfer_workers, 0, _MAX_WORKERS)
        _check_range("disk_io_workers", self.disk_io_workers, 1, _MAX_WORKERS)
        _check_range("disk_io_threads", self.disk_io_threads, 1, _MAX_WORKERS)
        if self.disk_admit_uses < 1:
            raise ConfigError(f"disk_admit_uses must be at least 1, got {self.disk_admit_uses}")
        if not 0 < self.disk_low_watermark <= 1:
            raise ConfigError(f"disk_low_watermark must be in (0, 1], got {self.disk_low_watermark}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if self.max_connections < 0:
            raise ConfigError(f"max_connections must not be negative, got {self.max_connections}")
        self._check_cluster()

    def _check_cluster(self) -> None:
        _check_range("cluster_port", self.cluster_port, 0, 65534)
        _check_range("cluster_ttl_s", self.cluster_ttl_s, 1, 3600)
        _check_range("cluster_deadline_ms", self.cluster_deadline_ms, 10, 600_000)
        _check_range("cluster_index_blocks", self.cluster_index_blocks, 1, 1 << 30)
        if not self.cluster:
            return
        if not self.cluster.startswith("etcd://") or not all(_HOSTPORT_RE.match(a) for a in self.cluster_etcd):
            raise ConfigError(f"cluster must be etcd://HOST:PORT[,HOST:PORT...], got {self.cluster!r}")
        if not _NODE_RE.match(self.cluster_node):
            raise ConfigError(f"node_name {self.cluster_node!r} must be 1-64 characters of [A-Za-z0-9_.-]")
        if not _ADDRESS_RE.match(self.advertise):
            raise ConfigError(f"advertise must be a host name or IP address, got {self.advertise!r}")
        if not self.cluster_secret_file:
            raise ConfigError("cluster needs cluster_secret_file: a file of ours, mode 0600, holding the secret "
                              "every node of the cluster shares")

    @property
    def cluster_etcd(self) -> list[str]:
        """The etcd endpoints of `cluster` as HOST:PORT."""
        return [a for a in self.cluster.removeprefix("etcd://").split(",") if a]

    @property
    def cluster_node(self) -> str:
        return self.node_name or socket.gethostname()

    @property
    def instance_dir(self) -> Path:
        return instance_dir(self.runtime_dir, self.instance)

    @property
    def cpu_cache_bytes(self) -> int:
        return int(self.cpu_cache_gb * (1 << 30))

    @property
    def disk_cache_bytes(self) -> int:
        return int(self.disk_cache_gb * (1 << 30))

    @classmethod
    def load(
        cls,
        file: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> "ServiceConfig":
        """Defaults < TOML file (argument or KVBM_CONFIG) < KVBM_* variables < overrides."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        file = file or env.get("KVBM_CONFIG")
        if file:
            values.update(_read_toml(Path(file)))
        values.update(_from_env(cls, env))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return _build(cls, values)


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """How a client or tool finds a coordinator: an explicit endpoint, or instance + runtime dir."""

    instance: str = "default"
    runtime_dir: Path = dataclasses.field(default_factory=default_runtime_root)
    endpoint: str = ""  # overrides the runtime file when set
    timeout_s: float = 5.0  # deadline of one request
    setup_timeout_s: float = 120.0  # deadline of registering a layout (may create a pool)
    verify_checksums: bool = True  # check every loaded block against its stored checksum
    copy_threads: int = dataclasses.field(default_factory=lambda: min(4, os.cpu_count() or 1))  # per large copy

    def __post_init__(self) -> None:
        _check_values(self)
        check_instance(self.instance)
        if not self.endpoint:
            runtime.check_socket_room(self.instance_dir)
        _check_range("timeout_s", self.timeout_s, 0.001, _DAY_MS // 1000)
        _check_range("setup_timeout_s", self.setup_timeout_s, 0.001, _DAY_MS // 1000)
        _check_range("copy_threads", self.copy_threads, 1, _MAX_WORKERS)

    @property
    def instance_dir(self) -> Path:
        return instance_dir(self.runtime_dir, self.instance)

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "ClientConfig":
        values = _from_env(cls, os.environ if env is None else env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return _build(cls, values)


def instance_dir(runtime_dir: Path, instance: str) -> Path:
    return Path(runtime_dir) / check_instance(instance)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not TOML: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    section = data.get("kvbm", data)
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: kvbm must be a table of options, got {section!r}")
    return section


def _from_env(cls: type, env: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for field in dataclasses.fields(cls):
        raw = env.get("KVBM_" + field.name.upper())
        if raw is not None and raw != "":
            out[field.name] = raw
    return out


def _build(cls: type, values: dict[str, Any]):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
    defaults = cls()
    kwargs = {name: _coerce(name, value, type(getattr(defaults, name))) for name, value in values.items()}
    return cls(**kwargs)


def _coerce(name: str, value: Any, kind: type) -> Any:
    """`value` (TOML, environment text or a flag) as `kind`; ranges are checked by the config."""
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if value not in (0, 1):
                raise ValueError(value)
            return bool(value)
        if isinstance(value, bool):  # TOML true for a number or a name
            raise TypeError(value)
        if issubclass(kind, Path):
            if not isinstance(value, (str, os.PathLike)):
                raise TypeError(value)
            return Path(value).expanduser()
        if kind is int:
            return _integer(value)
        if kind is float:
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            return number
        return kind(value)
    except (TypeError, ValueError, OverflowError) as e:
        what = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, f"a {kind.__name__}")
        raise ConfigError(f"{name} must be {what}, got {value!r}") from e


def _integer(value: Any) -> int:
    """An int from an int, an integral finite float, or text naming either."""
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            value = float(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise ValueError(value)
