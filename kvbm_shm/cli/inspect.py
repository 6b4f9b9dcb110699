"""`kvbm-shm inspect [INSTANCE]`: what an instance holds in shared memory, read directly.

Per pool: geometry and namespace, blocks by state and tier, pinned blocks by client, the hit,
store and eviction counters, and the most reused prefixes. `--blocks` lists every block that is
not free; `--hash H` shows the blocks whose sequence hash starts with H (hex), with a check of
their bytes. Works with the coordinator running, hung or dead (post-mortem), and says which.
Exit status 0, or 2 when a segment of the instance could not be read (each one named on stderr)
or nothing of the instance exists.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..observe import node, snapshot
from . import common


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="read an instance's pools straight from shared memory")
    common.add_instance_args(p)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--blocks", action="store_true", help="list every block record that is not free")
    what.add_argument("--hash", metavar="H", type=_hex_prefix,
                      help="show the blocks whose sequence hash starts with H (hex)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="most reused prefixes to show (default 10)")
    p.add_argument("--timeout-s", type=float, default=1.0, help="how long to wait for the coordinator's stats")
    p.set_defaults(run=run)


def _hex_prefix(text: str) -> str:
    digits = text.lower().removeprefix("0x")
    if not digits or any(c not in "0123456789abcdef" for c in digits):
        raise argparse.ArgumentTypeError(f"{text!r} is not a hexadecimal hash (prefix)")
    return digits


def run(args: argparse.Namespace) -> int:
    instance, instance_dir = common.instance_location(args)
    report = snapshot.inspect_instance(instance, instance_dir, timeout_s=args.timeout_s, top=args.top,
                                       blocks=args.blocks, hash_prefix=args.hash)
    for err in report.errors:
        print(f"kvbm-shm inspect: {err.error}", file=sys.stderr)
    if report.coordinator.state == "absent":
        known = [i.instance for i in node.scan(common.runtime_root(args), with_mappers=False).instances]
        print(f"kvbm-shm inspect: nothing of instance {instance!r} on this node "
              f"(instances here: {', '.join(known) or 'none'})", file=sys.stderr)
    if args.json:
        common.print_json(report)
    elif report.coordinator.state != "absent":
        _print(report, args)
    if report.errors or report.coordinator.state == "absent":
        return 2
    return 0


def _print(r: snapshot.InstanceReport, args: argparse.Namespace) -> None:
    c = r.coordinator
    pid = f" (pid {c.pid})" if c.pid else ""
    print(f"instance {r.instance}: coordinator {c.state}{pid}" + (f": {c.note}" if c.note else ""))
    for pool in r.pools:
        _print_pool(pool, args)
    if r.clients:
        print("\nclients:")
        print(common.table(["ID", "NAME", "PID", "PINS", "WRITING", "LEASE LEFT"], [
            [x.client_id, x.name, x.pid, x.pins, x.pending, f"{x.expires_in_ms / 1000:.1f} s"] for x in r.clients],
            indent="  "))
    if r.cluster:
        _print_cluster(r.cluster)
    if args.hash is not None and not any(pool.records for pool in r.pools):
        print(f"\nno block with a hash starting {args.hash} is cached in instance {r.instance}")


def _print_cluster(g4: dict) -> None:
    k = g4.get("counters", {})
    print(f"\ncluster: node {g4.get('node')}, etcd {g4.get('etcd')}, control {g4.get('control')}, "
          f"events {g4.get('events')}")
    print(f"  remote index {g4.get('index_blocks', 0)} blocks (dropped at the bound {g4.get('index_dropped', 0)}); "
          f"remote hits {k.get('remote_hit_blocks', 0)} blocks ({common.human_bytes(k.get('remote_hit_bytes', 0))}), "
          f"served {k.get('served_blocks', 0)} blocks ({common.human_bytes(k.get('served_bytes', 0))})")
    print(f"  failures: fetch {k.get('fetch_errors', 0)}, read {k.get('read_failures', 0)}, "
          f"checksum {k.get('checksum_failures', 0)}, late {k.get('fetch_timeouts', 0)}; resyncs {k.get('resyncs', 0)}")
    nodes = g4.get("nodes", {})
    if nodes:
        print(common.table(["NODE", "STATE", "INDEX BLOCKS", "CONTROL"], [
            [name, n.get("state"), n.get("index_blocks"), n.get("control")] for name, n in sorted(nodes.items())],
            indent="  "))


def _print_pool(pool: snapshot.PoolReport, args: argparse.Namespace) -> None:
    g, b, k = pool.geometry, pool.blocks, pool.counters
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(pool.created_unix))
    print(f"\npool {pool.pool_id}  {pool.segment}  model {pool.model!r}  fingerprint {pool.fingerprint}")
    print(f"  created {created}, owner pid {pool.coordinator_pid}, "
          f"{common.human_bytes(g.segment_bytes)} segment")
    print(f"  geometry: {g.num_blocks} blocks of {common.human_bytes(g.block_bytes)} (stride {g.block_stride}); "
          f"{g.num_layers} layers x {g.outer_dim} x {g.page_size} tokens x {g.inner_dim} {g.dtype}; "
          f"tp {g.tp_rank}/{g.tp_size}")
    tiers = ", ".join(f"{t} {n}" for t, n in pool.registered_by_tier.items()) or "-"
    extra = "".join(f", {name} {getattr(b, name)}" for name in ("torn", "invalid") if getattr(b, name))
    print(f"  blocks: free {b.free}, partial {b.partial}, complete {b.complete}, registered {b.registered} "
          f"(by tier: {tiers}), pinned {b.pinned}, evictable {b.inactive}{extra}")
    if pool.pinned_by_client:
        holders = ", ".join(f"client {h.client_id}" + (f" ({h.name}, pid {h.pid})" if h.name else "")
                            + f": {h.blocks} blocks, {h.refs} pins" for h in pool.pinned_by_client)
        print(f"  pinned by (last pinner): {holders}")
    print(f"  lookups {k.get('lookups', 0)}: {k.get('hit_blocks', 0)} of {k.get('lookup_blocks', 0)} blocks hit "
          f"({common.percent(pool.hit_rate)}); stored {k.get('stored_blocks', 0)}, deduplicated "
          f"{k.get('dedup_blocks', 0)}, evicted {k.get('evicted_blocks', 0)}, no room {k.get('no_room_blocks', 0)}, "
          f"invalidated {k.get('invalidated_blocks', 0)}")
    if pool.top_prefixes:
        print("  most reused prefixes:")
        print(_records(pool.top_prefixes, checksum=False))
    if pool.records is not None and (args.blocks or pool.records):
        print(f"  {'blocks' if args.blocks else 'matching blocks'}:")
        print(_records(pool.records, checksum=args.hash is not None) if pool.records else "    none")


def _records(records: list[snapshot.BlockRecord], checksum: bool) -> str:
    headers = ["BLOCK", "STATE", "TIER", "HASH", "HITS", "PINS", "OWNER", "PRIO", "LAST USE"]
    if checksum:
        headers += ["CHECKSUM", "BYTES"]
    rows = []
    for r in records:
        row = [r.block, r.state + (" (torn)" if r.torn else ""), r.tier, r.hash, r.hits, r.refcount, r.owner,
               r.priority, "-" if r.last_use_age_s is None else f"{r.last_use_age_s:.1f} s ago"]
        if checksum:
            row += [r.checksum, {True: "ok", False: "MISMATCH", None: "-"}[r.checksum_ok]]
        rows.append(row)
    return common.table(headers, rows, indent="    ")
