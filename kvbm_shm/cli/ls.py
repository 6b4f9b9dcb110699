"""`kvbm-shm ls`: every kvbm shm segment on the node and every instance, whose they are.

One row per `/dev/shm/kvbm-*` segment: instance, kind, model, size, blocks, owner pid, whether
the owner lives, and the pids that map it; orphans (no live coordinator of their instance) are
marked, and so are segments that are not ours to trust (`FOREIGN`, with the owning user: another
user's file at a kvbm name, a link, a file open to others; never adopted, never removed). Then
one row per instance (segments and runtime directories under `--runtime-dir`; the cluster node it
is, with `--cluster`), then what could
not be read (another user's runtime directories), on stderr. Read-only: it takes no lock and
works whatever state the coordinators are in.
"""

from __future__ import annotations

import argparse
import sys

from ..observe import node
from . import common


def add_parser(sub) -> None:
    p = sub.add_parser("ls", help="list kvbm shared-memory segments and instances on this node")
    common.add_node_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    view = node.scan(common.runtime_root(args))
    for u in view.unreadable:
        print(f"kvbm-shm ls: cannot read {u.path}: {u.reason}", file=sys.stderr)
    if args.json:
        common.print_json(view)
        return 0
    if not view.segments and not view.instances:
        print("no kvbm segments or instances on this node")
        return 0
    rows = [[s.name, s.instance or "?", s.kind, _short(s.model or "-"), common.human_bytes(s.size_bytes),
             s.num_blocks if s.num_blocks is not None else "-", s.owner_pid or "-", _status(s),
             ",".join(map(str, s.mapped_by)) or "-"] for s in view.segments]
    if rows:
        print(common.table(["SEGMENT", "INSTANCE", "KIND", "MODEL", "SIZE", "BLOCKS", "OWNER", "STATUS", "MAPPED BY"],
                           rows))
    for s in view.segments:
        if s.error:
            print(f"  {s.error}")
    if view.instances:
        print()
        print(common.table(["INSTANCE", "COORDINATOR", "STATE", "SEGMENTS", "SHM", "CLUSTER", "RUNTIME DIR"], [
            [i.instance, i.pid or "-", "running" if i.alive else "dead", i.segments,
             common.human_bytes(i.segment_bytes), i.cluster or "-", i.runtime_dir or "-"] for i in view.instances]))
    orphans = [s for s in view.segments if s.orphan]
    if orphans:
        print(f"\n{len(orphans)} orphaned segment(s), "
              f"{common.human_bytes(sum(s.size_bytes for s in orphans))}: restarting their instance's coordinator "
              f"adopts their cached blocks; `kvbm-shm gc` removes them (and the cache with them)")
    return 0


def _status(s: node.SegmentInfo) -> str:
    if s.kind == "foreign":
        return f"FOREIGN ({s.user}, uid {s.uid})"
    if s.orphan:
        return "ORPHAN"
    if s.orphan is None:
        return "unknown"
    return "alive" if s.owner_alive else "instance live"


def _short(text: str, width: int = 32) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"
