"""`kvbm-shm top [INSTANCE]`: a live view of a running coordinator, refreshed every second.

On a terminal it is a full-screen view (rich): usage per tier, requests and lookups per second,
hit rate, store and hit throughput, evictions, the pools, and the clients with their leases;
q or Ctrl-C quits. When stdout is not a terminal, with `--json`, or without rich installed it
prints one line (one JSON object with `--json`) per refresh instead. `--iterations N` stops after
N refreshes. The view comes from lease-less Stats requests: `top` is not one of the clients shown.
A coordinator that stops answering is reported on each refresh until it answers again.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import time
from typing import Callable, Iterator

from .. import protocol as p
from ..errors import CoordinatorUnavailable
from ..observe import live
from ..observe.probe import StatsProbe, find_endpoint
from . import common


def add_parser(sub) -> None:
    parser = sub.add_parser("top", help="live view of a running coordinator")
    common.add_instance_args(parser)
    parser.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes (default 1)")
    parser.add_argument("--iterations", type=int, default=0, metavar="N", help="stop after N refreshes (default: never)")
    parser.add_argument("--timeout-s", type=float, default=1.0, help="how long to wait for each stats reply")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    instance, instance_dir = common.instance_location(args)
    with StatsProbe(find_endpoint(instance_dir), args.timeout_s) as probe:
        first = probe.stats()  # no coordinator: CoordinatorUnavailable, reported by main
        fancy = sys.stdout.isatty() and not args.json
        if fancy:
            try:
                import rich  # noqa: F401
            except ImportError:
                print("kvbm-shm top: rich is not installed (pip install 'kvbm-shm[tools]'); printing lines",
                      file=sys.stderr)
                fancy = False
        views = _views(probe, first)
        try:
            return _full_screen(views, args) if fancy else _lines(views, args)
        except KeyboardInterrupt:
            return 0


def _views(probe: StatsProbe, first: p.StatsReply) -> Iterator[tuple[live.TopView | None, str]]:
    """(view, "") per refresh, or (None, why) when the coordinator did not answer."""
    prev, prev_at, calls = first, time.monotonic(), 0
    yield live.summarize(first), ""
    while True:
        at = time.monotonic()
        calls += 1
        try:
            cur = probe.stats()
        except CoordinatorUnavailable as e:
            yield None, str(e)
            continue
        yield live.summarize(cur, prev, at - prev_at, own_requests=calls), ""
        prev, prev_at, calls = cur, at, 0


def _loop(views, args: argparse.Namespace, show: Callable, wait: Callable[[float], bool]) -> int:
    for i, (view, error) in enumerate(views, 1):
        show(view, error)
        if args.iterations and i >= args.iterations:
            return 0
        if not wait(args.interval):
            return 0
    return 0


def _lines(views, args: argparse.Namespace) -> int:
    def show(view: live.TopView | None, error: str) -> None:
        if view is None:
            print(f"{time.strftime('%H:%M:%S')} coordinator not answering: {error}", flush=True)
        elif args.json:
            common.print_json_line(view)
        else:
            print(_line(view), flush=True)

    return _loop(views, args, show, lambda s: time.sleep(s) or True)


def _rate(x: float | None, unit: str = "/s") -> str:
    return "-" if x is None else f"{x:.1f}{unit}"


def _byte_rate(x: float | None) -> str:
    return "-" if x is None else f"{common.human_bytes(x)}/s"


def _line(v: live.TopView) -> str:
    tiers = " ".join(f"{t.tier} {t.used_blocks}/{t.blocks} blocks ({common.human_bytes(t.used_bytes)}), "
                     f"pinned {t.pinned_blocks}" for t in v.tiers)
    return (f"{time.strftime('%H:%M:%S')} {v.instance} pid {v.pid} | {tiers} | {_rate(v.requests_per_s, ' req/s')}, "
            f"{_rate(v.lookups_per_s, ' lookups/s')}, hit {common.percent(v.hit_rate)} "
            f"(total {common.percent(v.hit_rate_total)}) | store {_byte_rate(v.store_bytes_per_s)}, "
            f"hit {_byte_rate(v.hit_bytes_per_s)}, evict {_rate(v.evictions_per_s)} | clients {len(v.clients)}"
            + (_cluster_line(v.cluster) if v.cluster is not None else ""))


def _cluster_line(c: live.ClusterView) -> str:
    return (f" | cluster node {c.node} (etcd {c.etcd}), peers {','.join(c.nodes) or '-'}, index {c.index_blocks} "
            f"blocks, remote hits {c.remote_hit_blocks} blocks ({common.human_bytes(c.remote_hit_bytes)}, "
            f"{_byte_rate(c.remote_hit_bytes_per_s)}), failures {c.failures}")


@contextlib.contextmanager
def _keys():
    """A `wait(seconds) -> bool` that returns False early when q is typed (stdin in cbreak mode)."""
    if not sys.stdin or not sys.stdin.isatty():
        yield lambda s: time.sleep(s) or True
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def wait(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([fd], [], [], left)[0] and b"q" in os.read(fd, 64).lower():
                return False
        return True

    try:
        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _full_screen(views, args: argparse.Namespace) -> int:
    from rich.live import Live

    last: list = [None]

    with _keys() as wait, Live(screen=True, auto_refresh=False) as screen:
        def show(view: live.TopView | None, error: str) -> None:
            if view is not None:
                last[0] = view
            if last[0] is not None:
                screen.update(_render(last[0], error), refresh=True)

        return _loop(views, args, show, wait)


def _render(v: live.TopView, error: str):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    title = Text.assemble((f"kvbm-shm top  {v.instance}", "bold"), "  (q quits)",
                          f"  coordinator pid {v.pid}, up {v.uptime_s:.0f} s, {len(v.clients)} client(s)")
    rates = Text(f"{_rate(v.requests_per_s, ' req/s')}  {_rate(v.lookups_per_s, ' lookups/s')}  "
                 f"hit {common.percent(v.hit_rate)} (total {common.percent(v.hit_rate_total)})  "
                 f"store {_byte_rate(v.store_bytes_per_s)}  hit {_byte_rate(v.hit_bytes_per_s)}  "
                 f"evictions {_rate(v.evictions_per_s)}  errors {v.errors_total}")
    parts = [title, rates]
    if error:
        parts.append(Text(f"coordinator not answering: {error}", style="bold red"))
    tiers = Table("tier", "used", "allocated", "budget", "blocks used", "pinned", title="usage", title_justify="left")
    for t in v.tiers:
        tiers.add_row(t.tier, common.human_bytes(t.used_bytes), common.human_bytes(t.allocated_bytes),
                      common.human_bytes(t.capacity_bytes), f"{t.used_blocks}/{t.blocks}", str(t.pinned_blocks))
    pools = Table("pool", "model", "blocks", "registered", "writing", "pinned", "evictable", "hit rate",
                  title="pools", title_justify="left")
    for x in v.pools:
        pools.add_row(str(x.pool_id), x.model, str(x.num_blocks), str(x.registered), str(x.partial), str(x.pinned),
                      str(x.inactive), common.percent(x.hit_rate))
    clients = Table("client", "name", "pid", "pins", "writing", "lease left", title="clients", title_justify="left")
    for c in v.clients:
        clients.add_row(str(c.client_id), c.name, str(c.pid), str(c.pins), str(c.pending),
                        f"{c.expires_in_ms / 1000:.1f} s")
    parts += [tiers, pools, clients]
    return Group(*parts)
