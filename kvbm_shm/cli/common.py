"""What the operator subcommands share: instance and runtime-dir arguments, JSON and table output.

`add_instance_args(parser)` adds `[INSTANCE]` (default: `KVBM_INSTANCE` or "default") and
`--runtime-dir`; `add_node_args(parser)` only `--runtime-dir`. `instance_location(args)` resolves
them the way clients do (`ClientConfig`). `print_json(obj)` writes one indented JSON document,
`print_json_line(obj)` one compact line (for streams); `table(headers, rows)` aligns columns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

from ..config import ClientConfig


def add_node_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime-dir", help="root of the instances' runtime directories "
                                              "(default: $KVBM_RUNTIME_DIR, $XDG_RUNTIME_DIR/kvbm-shm or /tmp/kvbm-shm-UID)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def add_instance_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("instance", nargs="?", help="instance name (default: $KVBM_INSTANCE or 'default')")
    add_node_args(parser)


def runtime_root(args: argparse.Namespace) -> Path:
    return ClientConfig.load(runtime_dir=args.runtime_dir).runtime_dir


def instance_location(args: argparse.Namespace) -> tuple[str, Path]:
    """(instance, its runtime directory)."""
    config = ClientConfig.load(instance=args.instance, runtime_dir=args.runtime_dir)
    return config.instance, config.instance_dir


def print_json(obj) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(obj), indent=2).decode() + "\n")


def print_json_line(obj) -> None:
    sys.stdout.write(msgspec.json.encode(obj).decode() + "\n")
    sys.stdout.flush()


def table(headers: list[str], rows: list[list], indent: str = "") -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def percent(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"
