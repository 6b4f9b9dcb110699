"""`kvbm-shm events [INSTANCE]`: print a coordinator's KV event stream live.

One line per event (batch sequence number, type, pool, tier, hashes), or with `--json` one JSON
object per batch. Gaps and coordinator restarts are reported on stderr. Runs until Ctrl-C, or
until `--count` batches were printed.
"""

from __future__ import annotations

import argparse
import sys
import time

from .. import runtime
from ..observe.events import EventStream, to_builtins
from ..observe.snapshot import TIER_NAMES
from . import common


def add_parser(sub) -> None:
    p = sub.add_parser("events", help="print the KV event stream of a coordinator")
    common.add_instance_args(p)
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N batches (default: run until Ctrl-C)")
    p.add_argument("--full", action="store_true", help="print every hash in full (default: abbreviated)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _, instance_dir = common.instance_location(args)
    info = runtime.trusted_info(instance_dir)
    printed = 0
    try:
        with EventStream(info.events_endpoint) as stream:
            print(f"listening to {info.events_endpoint}", file=sys.stderr, flush=True)
            while not args.count or printed < args.count:
                got = stream.receive(timeout_s=0.5)  # a bounded wait keeps Ctrl-C prompt
                if got is None:
                    continue
                if got.restarted:
                    print(f"coordinator restarted (instance id {got.batch.instance_id}): resynchronise",
                          file=sys.stderr)
                elif got.missed:
                    print(f"missed {got.missed} batch(es) before seq {got.batch.seq}", file=sys.stderr)
                if args.json:
                    common.print_json_line(to_builtins(got.batch))
                else:
                    _print(got.batch, args.full)
                printed += 1
    except KeyboardInterrupt:
        pass
    return 0


def _print(batch, full: bool) -> None:
    stamp = time.strftime("%H:%M:%S", time.localtime(batch.ts_ns / 1e9))
    for event in batch.events:
        line = f"{stamp} seq {batch.seq} {event.__struct_config__.tag:<7} pool {event.pool_id}"
        if hasattr(event, "tier"):
            hashes = [h.hex() if full else h.hex()[:12] for h in event.hashes]
            line += f" {TIER_NAMES.get(event.tier, event.tier)} {len(hashes)} block(s): {' '.join(hashes)}"
        print(line, flush=True)
