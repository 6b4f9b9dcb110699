"""Configuration: frozen objects, and the one place that reads `KVBM_*` environment variables.

`ServiceConfig` configures a coordinator (`kvbm-shm serve`); `ClientConfig` tells a client or a
tool where to find one. Values come, lowest precedence first, from the embedded defaults below,
a TOML file (`--config` or `KVBM_CONFIG`), `KVBM_<FIELD>` environment variables, and explicit
overrides (command-line flags). Unknown keys and malformed values raise `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,48}$")


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
    if not _INSTANCE_RE.match(name):
        raise ConfigError(f"instance name {name!r} must be 1-48 characters of [A-Za-z0-9_.-]")
    return name


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

    def __post_init__(self) -> None:
        check_instance(self.instance)
        if self.cpu_cache_gb <= 0:
            raise ConfigError(f"cpu_cache_gb must be positive, got {self.cpu_cache_gb}")
        if self.lease_ms < 50:
            raise ConfigError(f"lease_ms must be at least 50, got {self.lease_ms}")
        for name in ("max_leases", "max_leases_per_process", "max_pools"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.disk_cache_gb < 0:
            raise ConfigError(f"disk_cache_gb must not be negative, got {self.disk_cache_gb}")
        if self.transfer_workers < 0:
            raise ConfigError(f"transfer_workers must not be negative, got {self.transfer_workers}")
        if self.disk_io_workers < 1 or self.disk_io_threads < 1:
            raise ConfigError(f"disk_io_workers and disk_io_threads must be at least 1, got "
                              f"{self.disk_io_workers} and {self.disk_io_threads}")
        if self.disk_admit_uses < 1:
            raise ConfigError(f"disk_admit_uses must be at least 1, got {self.disk_admit_uses}")
        if not 0 < self.disk_low_watermark <= 1:
            raise ConfigError(f"disk_low_watermark must be in (0, 1], got {self.disk_low_watermark}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if self.max_connections < 0:
            raise ConfigError(f"max_connections must not be negative, got {self.max_connections}")

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
        check_instance(self.instance)
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.copy_threads < 1:
            raise ConfigError(f"copy_threads must be at least 1, got {self.copy_threads}")

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
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    return data.get("kvbm", data)


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
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if issubclass(kind, Path):
            return Path(value).expanduser()
        return kind(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"configuration value {name}={value!r} is not a valid {kind.__name__}") from e
