"""`kvbm-shm serve`: run the coordinator in the foreground until Ctrl-C or SIGTERM.

Prints the endpoint, then one status line that updates in place on a terminal (a log line every
30 s otherwise). Every option can also come from `KVBM_*` variables or `--config FILE.toml`.
"""

from __future__ import annotations

import argparse
import os
import logging
import sys
import time

from ..config import ServiceConfig


# One flag per `ServiceConfig` field, generated from this table, so flags and options cannot drift.
HELP = {
    "instance": "instance name (default: default)",
    "runtime_dir": "root of the runtime directories (sockets, runtime file)",
    "cpu_cache_gb": "G2 shared-memory budget in GiB (default 2)",
    "lease_ms": "client lease in ms (default 5000)",
    "max_leases": "open client leases in all (default 4096)",
    "max_leases_per_process": "open leases of one client process (default 64)",
    "max_pools": "pools (namespaces) of the instance (default 64)",
    "log_level": "DEBUG, INFO, WARNING or ERROR (default INFO)",
    "max_frame_bytes": "largest request in bytes (default 64 MiB)",
    "disk_cache_gb": "G3 disk budget in GiB (default 0: off)",
    "disk_dir": "G3 directory (default ~/.cache/kvbm-shm)",
    "metrics_port": "Prometheus metrics port (default 0: off)",
    "metrics_host": "address the metrics port binds (default 127.0.0.1; 0.0.0.0: all)",
    "max_connections": "control connections at once (default 0: the open-file limit minus a reserve)",
    "transfer_workers": "G1<->G2 transfer worker processes (default 1)",
    "disk_io_workers": "NVMe I/O worker processes (default 2)",
    "disk_io_threads": "blocks in flight per I/O worker (default 4)",
    "disk_write_through": "write every stored block to disk at once (default: write-back with admission)",
    "disk_admit_uses": "recent uses before write-back takes a block to disk (default 2; 1: all)",
    "disk_low_watermark": "write back when free and clean blocks fall under this share of a pool (default 0.25)",
    "cluster": "join a cluster: etcd://HOST:PORT[,HOST:PORT...] (default: none, this node stands alone)",
    "node_name": "this node's name in the cluster (default: the host name)",
    "advertise": "address the cluster endpoints bind and peers reach (default 127.0.0.1)",
    "cluster_port": "first of two TCP ports (control, events) for peers (default 0: any free ones)",
    "cluster_secret_file": "file (ours, 0600) holding the secret every node of the cluster shares",
    "cluster_ttl_s": "etcd lease of this node's key in seconds: a dead node leaves after this (default 5)",
    "cluster_deadline_ms": "a remote fetch that takes longer is a miss (default 1000)",
    "cluster_index_blocks": "remote index entries kept at most (default 1000000)",
}


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the coordinator")
    p.add_argument("--config", help="TOML file (keys as below, optionally under [kvbm])")
    for name, field in ServiceConfig.__dataclass_fields__.items():
        flag = "--" + name.replace("_", "-")
        if field.type == "bool":
            p.add_argument(flag, action="store_true", default=None, help=HELP[name])
        else:  # ranges are checked, with the option's name, by ServiceConfig
            p.add_argument(flag, type=float if field.type == "float" else None, help=HELP[name])
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..control.server import serve

    overrides = {name: getattr(args, name) for name in ServiceConfig.__dataclass_fields__}
    config = ServiceConfig.load(args.config, overrides=overrides)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tty = sys.stdout.isatty()
    last_line = [0.0]

    def ready(server) -> None:
        print(f"kvbm-shm coordinator for instance {config.instance!r} (pid {os.getpid()})\n"
              f"  endpoint {server.endpoint}\n  events   {server.events_endpoint}\n"
              f"  cpu cache {config.cpu_cache_gb:g} GiB"
              + (f"; disk cache {config.disk_cache_gb:g} GiB in {config.disk_dir}" if config.disk_cache_gb else "")
              + "; Ctrl-C stops", flush=True)

    def status(stats) -> None:
        blocks = sum(p.num_blocks for p in stats.pools)
        used = sum(p.registered + p.partial for p in stats.pools)
        hits = sum(p.counters.get("hit_blocks", 0) for p in stats.pools)
        looked = sum(p.counters.get("lookup_blocks", 0) for p in stats.pools)
        line = (f"pools {len(stats.pools)} | blocks {used}/{blocks} | pinned {sum(p.pinned for p in stats.pools)} "
                f"| clients {len(stats.clients)} | requests {stats.counters.get('requests', 0)} "
                f"| hit rate {hits / looked:.0%}" if looked else
                f"pools {len(stats.pools)} | blocks {used}/{blocks} | clients {len(stats.clients)} "
                f"| requests {stats.counters.get('requests', 0)}")
        if tty:
            print(f"\r\033[K{line}", end="", flush=True)
        elif time.monotonic() - last_line[0] >= 30:
            print(line, flush=True)
            last_line[0] = time.monotonic()

    serve(config, on_ready=ready, on_status=status)
    if tty:
        print()
    return 0
