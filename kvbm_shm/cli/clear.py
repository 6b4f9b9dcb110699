"""`kvbm-shm clear [INSTANCE] [--model M]`: empty a running coordinator's CPU cache.

Drops every cached block of the instance's pools, or only of the pools whose model contains
`M` (for a vLLM engine the model is its fingerprint, `vllm|<model path>|...`). The engines keep
serving: their next lookups miss and their next stores fill the cache again. A block pinned by a
client is dropped when its last pin goes. The disk tier keeps its copies. Each dropped block is
announced as a `removed` KV event. Prints how many blocks were dropped (`--json`: `{"cleared": N}`).
"""

from __future__ import annotations

import argparse

from ..client import Client
from ..config import ClientConfig
from . import common


def add_parser(sub) -> None:
    p = sub.add_parser("clear", help="drop every cached block of a running instance (or of one model's pools)")
    common.add_instance_args(p)
    p.add_argument("--model", default="", metavar="M", help="clear only the pools whose model contains M")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = ClientConfig.load(instance=args.instance, runtime_dir=args.runtime_dir)
    with Client(config, name="kvbm-shm clear") as client:
        cleared = client.clear(model=args.model)
    if args.json:
        common.print_json({"cleared": cleared})
    else:
        which = f" of the pools whose model contains {args.model!r}" if args.model else ""
        print(f"cleared {cleared} block(s){which} from instance {config.instance}")
    return 0
