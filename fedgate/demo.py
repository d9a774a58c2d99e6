"""`fedgate demo`: the main job, end to end, printed for a human.

Brings up east and west, calls `echo.demo.svc.clusterset.local` from east with unmodified curl
and shows where the answers came from against the configured weights (local 70 / remote 30),
commits new weights (50 / 50) to the rig's GitOps config repository and calls again, reaches a
Redis server that lives only in west with redis-cli, then tears everything down (even on
failure).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections import Counter
from pathlib import Path

import click

from clusters.rig import bringup, config_repo, lifecycle

ECHO_URL = "http://echo.demo.svc.clusterset.local:8080/"
REDIS_HOST = "redis.demo.svc.clusterset.local"
POLICY_TIMEOUT = 30.0  # a commit reaches the sidecars in about a second on the rig


def _in_pod(
    rig_dir: Path, target: str, script: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    cluster, _, pod = target.partition("/")
    record = lifecycle.load(rig_dir).pod(cluster, pod)
    assert record is not None, target
    return subprocess.run(
        ["ip", "netns", "exec", record.netns, "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def curl_many(rig_dir: Path, target: str, url: str, calls: int) -> tuple[Counter[str], int]:
    """Run `calls` sequential curl requests in the pod; count answers per cluster and failures."""
    script = (
        f"for i in $(seq {calls}); do curl -s --noproxy '*' --max-time 5 {shlex.quote(url)}"
        " || echo FAILED; done"
    )
    out = _in_pod(rig_dir, target, script, timeout=30 + calls * 0.5).stdout
    clusters: Counter[str] = Counter()
    failures = 0
    for line in out.splitlines():
        try:
            clusters[json.loads(line)["cluster"]] += 1
        except (ValueError, KeyError, TypeError):
            failures += 1
    return clusters, failures


def policy_weights(rig_dir: Path, cluster: str) -> list[tuple[str, int]]:
    """The echo.demo cluster weights the cluster's client sidecar runs ([] without a policy)."""
    snap = bringup.sidecar_config(rig_dir, cluster, "client").get("snapshot")
    for p in snap.get("policies", []) if isinstance(snap, dict) else []:
        if (p.get("namespace"), p.get("name")) == ("demo", "echo"):
            return [(w["cluster"], w["weight"]) for w in p["clusterWeights"]]
    return []


def wait_policy(rig_dir: Path, local: int, remote: int, timeout: float = POLICY_TIMEOUT) -> float:
    """Seconds until every client sidecar runs these weights; RuntimeError after `timeout`."""
    started = time.monotonic()
    want = [("local", local), ("remote", remote)]
    for c in lifecycle.load(rig_dir).clusters:
        while (seen := policy_weights(rig_dir, c.name)) != want:
            if time.monotonic() - started > timeout:
                raise RuntimeError(
                    f"{c.name}/client runs weights {seen}, not {want}, after {timeout:.0f} s "
                    "(see `fedgate config status` and the config-sync log)"
                )
            time.sleep(0.1)
    return time.monotonic() - started


def _calls_round(rig_dir: Path, calls: int, local: int, remote: int) -> bool:
    click.secho(f"== {calls} x curl {ECHO_URL} from east/client", bold=True)
    counts, failures = curl_many(rig_dir, "east/client", ECHO_URL, calls)
    total = sum(counts.values())
    for cluster in sorted(counts):
        click.echo(
            f"   answered by {cluster:<5} {counts[cluster]:>4}  "
            f"({100 * counts[cluster] / max(total, 1):.1f} %)"
        )
    click.echo(f"   configured: local (east) {local} %, remote (west) {remote} %")
    click.echo(f"   failed calls: {failures}")
    return failures == 0 and counts.get("west", 0) > 0 and counts.get("east", 0) > 0


def run(rig_dir: Path, command: bringup.RigCommand, calls: int, keep: bool) -> int:
    t0 = time.monotonic()
    lifecycle.down(rig_dir)  # a previous crashed run must not block this one
    ok = True
    try:
        click.secho("== bringing up clusters east and west", bold=True)
        bringup.up(rig_dir, 2, command, progress=lambda m: click.echo(f"   {m}"))
        click.secho(
            "== starting redis-server as pod west/redis, exported as redis.demo:6379", bold=True
        )
        bringup.add_redis(rig_dir, command, "west")

        ok = _calls_round(rig_dir, calls, 70, 30)

        click.secho(
            "== git commit to the rig's config repository: echo.demo local 50 / remote 50",
            bold=True,
        )
        sha = config_repo.commit(
            config_repo.repo_dir(rig_dir),
            {config_repo.ECHO_POLICY_FILE: config_repo.echo_policy(50, 50)},
            "echo.demo: local 50 / remote 50",
        )
        took = wait_policy(rig_dir, 50, 50)
        click.echo(
            f"   commit {sha[:12]} validated, applied and running in the sidecars in {took:.1f} s"
        )
        ok = _calls_round(rig_dir, calls, 50, 50) and ok

        click.secho(
            f"== redis-cli -h {REDIS_HOST} from east/client (server only in west)", bold=True
        )
        script = (
            f"redis-cli -h {REDIS_HOST} -p 6379 PING && "
            f"redis-cli -h {REDIS_HOST} -p 6379 SET greeting 'hello from east' && "
            f"redis-cli -h {REDIS_HOST} -p 6379 GET greeting"
        )
        res = _in_pod(rig_dir, "east/client", script, timeout=30)
        for line in (res.stdout + res.stderr).splitlines():
            click.echo(f"   {line}")
        ok = ok and res.returncode == 0 and "hello from east" in res.stdout
    except Exception as e:
        click.secho(f"demo failed: {e}", fg="red")
        ok = False
    finally:
        if keep and ok:
            click.echo("rig left up: `fedgate rig status`, `fedgate rig down` when done")
        else:
            click.secho("== tearing down", bold=True)
            lifecycle.down(rig_dir)
    click.secho(
        f"== demo {'succeeded' if ok else 'FAILED'} in {time.monotonic() - t0:.1f} s",
        bold=True,
        fg="green" if ok else "red",
    )
    return 0 if ok else 1
