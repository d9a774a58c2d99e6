"""`fedgate top`: live request rates per service and per cluster pair, in the terminal.

Scrapes the `/metrics` of the proxies (every sidecar and gateway of the rig, or the
`--target`s given), waits `--interval` seconds, scrapes again and prints the rates of
`fedgate_requests_total` (fedgate.rates does the arithmetic); then refreshes every interval,
or exits after one table with `--once`. Rig admin ports listen on 127.0.0.1 inside each pod's
or cluster's network namespace, so rig targets are read with `ip netns exec ... curl`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click

from clusters.rig import topology
from fedgate import rates
from fedgate.errors import FedgateError, ScrapeError

SCRAPE_TIMEOUT = 2.0
PROXY_COMMANDS = ("sidecar", "gateway")


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    url: str
    netns: str = ""  # "": reachable from here


def parse_target(text: str) -> Target:
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise click.BadParameter(f"{text!r}: expected NAME=http://host:port/metrics")
    return Target(name, url)


def rig_targets(rig_dir: Path) -> list[Target]:
    """Every sidecar and gateway of the rig, by its `--admin` address."""
    from clusters.rig import lifecycle
    from clusters.rig.errors import RigError

    try:
        state = lifecycle.load(rig_dir)
    except RigError as e:
        raise click.ClickException(f"{e}; or pass --target NAME=URL") from e
    out = []
    for p in state.processes:
        argv = list(p.argv)
        if not any(c in argv for c in PROXY_COMMANDS) or "--admin" not in argv:
            continue
        admin = argv[argv.index("--admin") + 1]
        out.append(Target(p.name, f"http://{admin}/metrics", p.netns))
    if not out:
        raise click.ClickException(f"the rig at {rig_dir} runs no sidecar or gateway")
    return out


def fetch(target: Target) -> str:
    if target.netns:
        argv = ["ip", "netns", "exec", target.netns, "curl", "-sS", "--fail", "--noproxy", "*"]
        done = subprocess.run(
            [*argv, "-m", str(SCRAPE_TIMEOUT), target.url],
            capture_output=True,
            text=True,
            timeout=SCRAPE_TIMEOUT + 5,
            check=False,
        )
        if done.returncode != 0:
            raise ScrapeError(f"{target.name} ({target.url}): {done.stderr.strip()[:200]}")
        return done.stdout
    try:
        with urllib.request.urlopen(target.url, timeout=SCRAPE_TIMEOUT) as response:
            body: bytes = response.read()
            return body.decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as e:
        raise ScrapeError(f"{target.name} ({target.url}): {e}") from e


def scrape_all(targets: list[Target]) -> tuple[rates.Scrape, list[str]]:
    """One scrape of every target (in parallel), merged; and what failed, with why."""

    def one(t: Target) -> rates.Scrape | str:
        try:
            return rates.parse(fetch(t), time.monotonic(), target=t.name)
        except FedgateError as e:
            return str(e)

    with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        results = list(pool.map(one, targets))
    scrapes = [r for r in results if isinstance(r, rates.Scrape)]
    failures = [r for r in results if isinstance(r, str)]
    if not scrapes:
        raise click.ClickException("no target answered:\n  " + "\n  ".join(failures))
    return rates.merge(scrapes), failures


def table_json(table: rates.RequestTable) -> dict[str, object]:
    def rows(rs: tuple[rates.Row, ...], keys: tuple[str, ...]) -> list[dict[str, object]]:
        return [
            {**dict(zip(keys, r.key, strict=True)), "rps": r.rps, "errors_per_second": r.errors}
            for r in rs
        ]

    return {
        "seconds": table.seconds,
        "series": table.series,
        "services": rows(table.services, ("service",)),
        "pairs": rows(table.pairs, ("source_cluster", "destination_cluster")),
    }


@click.command("top")
@click.option(
    "--rig-dir",
    type=click.Path(path_type=Path),
    default=topology.DEFAULT_RIG_DIR,
    show_default=True,
    help="Without --target: every sidecar and gateway of the rig at this directory.",
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    help="NAME=URL of a /metrics endpoint (repeatable).",
)
@click.option(
    "--interval",
    type=click.FloatRange(0.2, 3600),
    default=2.0,
    show_default=True,
    help="Seconds between scrapes (the rate window).",
)
@click.option("--once", is_flag=True, help="Print one table (two scrapes) and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --once: print the table as JSON.")
def top(
    rig_dir: Path, targets: tuple[str, ...], interval: float, once: bool, as_json: bool
) -> None:
    """Live request rates per service and per cluster pair (from the proxies' /metrics)."""
    chosen = [parse_target(t) for t in targets] if targets else rig_targets(rig_dir)
    before, _ = scrape_all(chosen)
    while True:
        time.sleep(interval)  # the rate window between two scrapes
        after, failures = scrape_all(chosen)
        table = rates.request_table(before, after)
        if as_json:
            click.echo(json.dumps({**table_json(table), "unreachable": failures}))
        else:
            text = rates.render(table, f"fedgate top: {len(chosen)} targets")
            if failures:
                text += "\n\nunreachable:\n  " + "\n  ".join(failures)
            if not once and sys.stdout.isatty():
                click.echo("\x1b[H\x1b[2J", nl=False)  # redraw in place
            click.echo(text)
        if once:
            return
        before = after
