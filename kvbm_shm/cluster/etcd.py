"""A minimal etcd v3 client over etcd's JSON gateway (HTTP/1.1, the standard library only).

Only what membership needs: lease grant / keep-alive / revoke, put under a lease, read a prefix,
delete. Keys and values are bytes (the gateway carries them base64 encoded); lease ids are ints.
Every call has a deadline (`timeout_s`) and tries the endpoints in turn, starting with the one that
answered last; when none answers it raises `EtcdUnavailable`. Calls block: they run on the
cluster's membership thread, never on the coordinator's loop.

Why not a client library: the Python etcd clients either fail to import with current protobuf
(etcd3) or pull in an HTTP/asyncio stack for the same gateway calls; the gateway is a stable part
of etcd 3.4+, and these calls are five small JSON requests.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

from ..errors import ErrorCode, KvbmError


class EtcdUnavailable(KvbmError):
    code = ErrorCode.UNAVAILABLE


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix`."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class EtcdClient:
    def __init__(self, endpoints: list[str], timeout_s: float = 1.0):
        self.endpoints = [e if e.startswith("http") else f"http://{e}" for e in endpoints]
        self.timeout_s = timeout_s
        self._first = 0
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy

    def _call(self, path: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        errors = []
        for i in range(len(self.endpoints)):
            k = (self._first + i) % len(self.endpoints)
            req = urllib.request.Request(self.endpoints[k] + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with self._opener.open(req, timeout=self.timeout_s) as resp:
                    out = json.loads(resp.read(1 << 24) or b"{}")
                self._first = k
                return out
            except urllib.error.HTTPError as e:
                errors.append(f"{self.endpoints[k]}: HTTP {e.code} {e.read(512)!r}")
            except (OSError, ValueError) as e:  # refused, timed out, reset, not JSON
                errors.append(f"{self.endpoints[k]}: {e}")
        raise EtcdUnavailable("etcd did not answer: " + "; ".join(errors), ErrorCode.UNAVAILABLE)

    def grant(self, ttl_s: int) -> int:
        return int(self._call("/v3/lease/grant", {"TTL": ttl_s})["ID"])

    def keepalive(self, lease: int) -> bool:
        """Renew `lease`; False when etcd no longer knows it (expired or revoked)."""
        result = self._call("/v3/lease/keepalive", {"ID": lease}).get("result", {})
        return int(result.get("TTL", 0)) > 0

    def revoke(self, lease: int) -> None:
        self._call("/v3/lease/revoke", {"ID": lease})

    def put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        self._call("/v3/kv/put", body)

    def get_prefix(self, prefix: bytes) -> dict[bytes, bytes]:
        out = self._call("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        return {base64.b64decode(kv["key"]): base64.b64decode(kv.get("value", ""))
                for kv in out.get("kvs", [])}

    def delete(self, key: bytes) -> None:
        self._call("/v3/kv/deleterange", {"key": _b64(key)})
