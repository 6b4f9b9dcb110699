"""Entry point of the `kvbm-shm` command: parses arguments and dispatches to a subcommand."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import KvbmError
from ..protocol import PROTOCOL_VERSION
from . import clear, events, gc, inspect, ls, serve, top

SUBCOMMANDS = (serve, ls, inspect, top, events, gc, clear)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvbm-shm", description="Node-local KV-cache block manager.")
    parser.add_argument("--version", action="version", version=f"kvbm-shm {__version__} (protocol {PROTOCOL_VERSION})")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KvbmError as e:
        print(f"kvbm-shm {args.command}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or directory the command could not use (another user's, ...)
        where = f" {e.filename}" if e.filename else ""
        print(f"kvbm-shm {args.command}: cannot use{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
