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


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the coordinator")
    p.add_argument("--config", help="TOML file (keys as below, optionally under [kvbm])")
    p.add_argument("--instance", help="instance name (default: default)")
    p.add_argument("--cpu-cache-gb", type=float, help="G2 shared-memory budget in GiB (default 2)")
    p.add_argument("--runtime-dir", help="root of the runtime directories (sockets, runtime file)")
    p.add_argument("--lease-ms", type=int, help="client lease in ms (default 5000)")
    p.add_argument("--disk-cache-gb", type=float, help="G3 disk budget in GiB (default 0: off)")
    p.add_argument("--disk-dir", help="G3 directory (default ~/.cache/kvbm-shm)")
    p.add_argument("--disk-io-workers", type=int, help="NVMe I/O worker processes (default 2)")
    p.add_argument("--disk-write-through", action="store_true", default=None,
                   help="write every stored block to disk at once (default: write-back with admission)")
    p.add_argument("--metrics-port", type=int, help="Prometheus metrics port (default 0: off)")
    p.add_argument("--metrics-host", help="address the metrics port binds (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--max-connections", type=int,
                   help="control connections at once (default 0: the open-file limit minus a reserve)")
    p.add_argument("--transfer-workers", type=int, help="G1<->G2 transfer worker processes (default 1)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..control.server import serve

    overrides = {k: getattr(args, k) for k in ("instance", "cpu_cache_gb", "runtime_dir", "lease_ms",
                                               "disk_cache_gb", "disk_dir", "metrics_port", "metrics_host", "log_level",
                                               "transfer_workers", "disk_io_workers", "disk_write_through",
                                               "max_connections")}
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
