"""Fixtures of the cluster tests: a real etcd on a free loopback port, a cluster secret, and
coordinators started as separate nodes (each its own instance, runtime directory, node name and
NIXL agent; UCX over TCP on loopback). Tests skip, saying why, only where etcd or NIXL is not
installed (tools/setup_cluster_env.sh installs both)."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from kvbm_shm.cluster.etcd import EtcdClient, EtcdUnavailable
from kvbm_shm.shm import list_segments

from ..procs import CoordinatorProcess, free_port

UCX_ENV = {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo", "UCX_MODULES": "^ib", "UCX_LOG_LEVEL": "error",
           "NIXL_LOG_LEVEL": "WARN"}


def _missing() -> str:
    if shutil.which("etcd") is None:
        return "etcd is not installed (tools/setup_cluster_env.sh installs etcd-server)"
    if importlib.util.find_spec("nixl") is None:
        return "nixl is not installed (tools/setup_cluster_env.sh installs nixl==1.5.1 and nixl-cu12==1.5.1)"
    return ""


@pytest.fixture(autouse=True)
def _needs_etcd_and_nixl():
    why = _missing()
    if why:
        print(f"SKIP: {why}")
        pytest.skip(why)


class Etcd:
    """A single-member etcd on loopback, in a temporary data directory."""

    def __init__(self, root: Path):
        self.root = root
        self.port, self.peer_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.port}"

    def start(self) -> "Etcd":
        log = open(self.root / "etcd.log", "ab")
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            ["etcd", "--name", "t", "--data-dir", str(self.root / "etcd"),
             "--listen-client-urls", f"http://127.0.0.1:{self.port}",
             "--advertise-client-urls", f"http://127.0.0.1:{self.port}",
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}"], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = EtcdClient([f"127.0.0.1:{self.port}"], timeout_s=0.5)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.get_prefix(b"/")
                return self
            except EtcdUnavailable:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"etcd did not start: {(self.root / 'etcd.log').read_text()[-2000:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def keys(self, prefix: bytes = b"/kvbm-shm/nodes/") -> dict[bytes, bytes]:
        return EtcdClient([f"127.0.0.1:{self.port}"]).get_prefix(prefix)


class Cluster:
    """Nodes of one test cluster; all stopped, and checked for leftovers, at teardown."""

    def __init__(self, root: Path, etcd: Etcd):
        self.root = root
        self.etcd = etcd
        self.secret = root / "secret"
        fd = os.open(self.secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, secrets.token_hex(32).encode())
        os.close(fd)
        self.tag = uuid.uuid4().hex[:6]
        self.nodes: dict[str, CoordinatorProcess] = {}

    def start(self, name: str, *extra: str, ttl_s: int = 2, deadline_ms: int = 3000,
              cpu_cache_gb: float = 0.0625) -> CoordinatorProcess:
        runtime_dir = Path(tempfile.mkdtemp(prefix=f"kc{name}", dir="/tmp"))
        node = CoordinatorProcess(
            f"c{self.tag}{name}", runtime_dir, "--cluster", self.etcd.url, "--node-name", name,
            "--cluster-secret-file", str(self.secret), "--cluster-ttl-s", str(ttl_s),
            "--cluster-deadline-ms", str(deadline_ms), "--transfer-workers", "0", "--log-level", "DEBUG", *extra,
            cpu_cache_gb=cpu_cache_gb, env=UCX_ENV)
        self.nodes[name] = node.start(timeout_s=60)
        return node

    def close(self) -> None:
        left = []
        for name, node in self.nodes.items():
            node.stop()
            killed = node.proc.returncode == -signal.SIGKILL  # a killed node leaves its pools by design
            left += [] if killed else node.remove_leftovers()
            node.remove_leftovers()
            print(f"--- log of node {name} (last 3000 characters)\n{node.log()[-3000:]}")  # shown when a test fails
            shutil.rmtree(node.runtime_dir, ignore_errors=True)
        assert not left, f"segments left in /dev/shm after the test: {left}"


@pytest.fixture
def etcd():
    root = Path(tempfile.mkdtemp(prefix="ke", dir="/tmp"))
    server = Etcd(root).start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster(etcd):
    c = Cluster(etcd.root, etcd)
    yield c
    c.close()
    assert not list_segments(f"kvbm-c{c.tag}"), "segments left in /dev/shm"
