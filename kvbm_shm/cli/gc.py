"""`kvbm-shm gc`: remove the segments, sockets and runtime files of dead instances.

Never touches a live instance: each instance is cleaned only while `gc` holds its lock (see
`observe.gc`). `--dry-run` shows what would be removed and changes nothing. Naming instances limits the
cleaning to them (the default is every instance on the node). Use the same
`--runtime-dir` as the coordinators.
"""

from __future__ import annotations

import argparse

from ..observe import gc
from . import common


def add_parser(sub) -> None:
    p = sub.add_parser("gc", help="remove what dead instances left in /dev/shm and the runtime directory")
    p.add_argument("instances", nargs="*", metavar="INSTANCE", help="clean only these instances (default: all)")
    common.add_node_args(p)
    p.add_argument("--dry-run", action="store_true", help="show what would be removed; remove nothing")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    report = gc.collect(common.runtime_root(args), dry_run=args.dry_run, instances=args.instances or None)
    if args.json:
        common.print_json(report)
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for r in report.removed:
        held = f" (still mapped by pids {', '.join(map(str, r.mapped_by))})" if r.mapped_by else ""
        size = f" {common.human_bytes(r.size_bytes)}" if r.size_bytes else ""
        print(f"{verb} {r.what} {r.path}{size}{held}")
    for k in report.kept:
        print(f"kept {k.path}: {k.reason}")
    freed = sum(r.size_bytes for r in report.removed)
    print(f"{verb} {len(report.removed)} item(s), {common.human_bytes(freed)} of shared memory"
          if report.removed else "nothing to remove")
    return 0
