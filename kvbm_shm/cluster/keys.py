"""CURVE keys of a cluster, derived from one shared secret, and the sockets that use them.

Every node of a cluster reads the same secret from `cluster_secret_file` (a regular file of our
uid, mode 0600, at least 32 bytes; anything else is refused with `ForeignError` or `ConfigError`).
Two Curve25519 key pairs derive from it by BLAKE2b with distinct labels: the server pair (every
node's cluster endpoints) and the client pair (every node's connections to peers). A server
accepts a connection only if the ZAP handler (`Authenticator`, a libzmq-driven thread) sees the
client public key derived from the secret; a client that does not hold the secret cannot derive
the server key, and one that learnt it still fails the ZAP check. So only holders of the secret
talk to a node's cluster endpoints; nothing on them is ever plain text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat

import zmq
import zmq.auth.thread

from ..errors import ConfigError
from ..ownership import check_file

ZAP_DOMAIN = "kvbm-cluster"
MIN_SECRET_BYTES = 32
MAX_SECRET_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class ClusterKeys:
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_secret(cls, secret: bytes) -> "ClusterKeys":
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"the cluster secret is {len(secret)} bytes, at least {MIN_SECRET_BYTES} are needed")
        pairs = []
        for label in (b"kvbm-cluster-server", b"kvbm-cluster-client"):
            raw = hashlib.blake2b(secret, digest_size=32, person=label[:16], salt=label[-16:]).digest()
            secret_z85 = zmq.utils.z85.encode(raw)
            pairs.append((zmq.curve_public(secret_z85), secret_z85))
        (sp, ss), (cp, cs) = pairs
        return cls(sp, ss, cp, cs)

    @classmethod
    def from_file(cls, path: str) -> "ClusterKeys":
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise ConfigError(f"cannot open cluster_secret_file {path}: {e.strerror}") from e
        try:
            st = os.fstat(fd)
            check_file(path, st)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SECRET_BYTES:
                raise ConfigError(f"cluster_secret_file {path} must be a regular file of at most "
                                  f"{MAX_SECRET_BYTES} bytes")
            secret = os.read(fd, MAX_SECRET_BYTES).strip()
        finally:
            os.close(fd)
        return cls.from_secret(secret)


def secure_server(sock: zmq.Socket, keys: ClusterKeys) -> None:
    sock.curve_server = True
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.zap_domain = ZAP_DOMAIN.encode()


def secure_client(sock: zmq.Socket, keys: ClusterKeys) -> None:
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret


class Authenticator:
    """ZAP handler of a context: CURVE clients with the cluster's client key pass, all else fails."""

    def __init__(self, ctx: zmq.Context, keys: ClusterKeys):
        self._auth = zmq.auth.thread.ThreadAuthenticator(ctx, log=None)
        self._auth.start()
        self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=_OnlyKey(keys.client_public))

    def close(self) -> None:
        self._auth.stop()


class _OnlyKey:
    def __init__(self, public: bytes):
        self.public = public

    def callback(self, domain: str, key_z85: bytes) -> bool:
        return domain == ZAP_DOMAIN and key_z85 == self.public
