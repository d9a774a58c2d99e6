"""`fedgate check`: is the federation healthy? One line per check, ✓ ‼ ✗, hints, exit status.

Like `linkerd check` and `istioctl analyze`. The collector (`fedgate.check_collect`) reads
etcd, the controllers, the gateways and (with `--kubeconfig` or `--in-cluster`) the Kubernetes
API; `fedgate.checks` decides. With `--rig-dir` and no `--etcd` the command runs itself inside
the rig's control namespace, naming every controller replica of the rig.

Exit status: 0 when nothing failed (warnings allowed), 1 when a check failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

import click

from fedgate.cli_status import etcd_or_rig, rerun_in_rig


@click.command("check")
@etcd_or_rig
@click.option(
    "--controller-admin",
    "controller_admins",
    multiple=True,
    help="A controller replica's admin address (repeat for each; the leader is found in etcd).",
)
@click.option(
    "--kubeconfig",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also check this cluster's Kubernetes API: RBAC of the agent and the MCS CRDs.",
)
@click.option(
    "--context",
    "contexts",
    multiple=True,
    help="A kubeconfig context to check (repeat for each cluster; default: the current one).",
)
@click.option("--in-cluster", is_flag=True, help="Check the API with the pod's ServiceAccount.")
@click.option(
    "--warn-days",
    type=float,
    default=7.0,
    show_default=True,
    help="Warn for a root expiring within this many days.",
)
@click.option(
    "--timeout",
    type=float,
    default=3.0,
    show_default=True,
    help="Seconds to wait for each component.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def check(
    etcd_endpoints: str,
    rig_dir: Path,
    controller_admins: tuple[str, ...],
    kubeconfig: Path | None,
    contexts: tuple[str, ...],
    in_cluster: bool,
    warn_days: float,
    timeout: float,
    as_json: bool,
) -> None:
    """Check the federation: Kubernetes API and RBAC, controllers, clusters, gateway links,
    certificates, clocks and GitOps; exit 1 if any check fails."""
    from fedgate import check_collect, checks

    if not etcd_endpoints:
        args = [
            *(f"--controller-admin={a}" for a in controller_admins),
            *([f"--kubeconfig={kubeconfig.absolute()}"] if kubeconfig is not None else []),
            *(f"--context={c}" for c in contexts),
            *(["--in-cluster"] if in_cluster else []),
            f"--warn-days={warn_days}",
            f"--timeout={timeout}",
            *(["--json"] if as_json else []),
        ]
        sys.exit(_in_rig(rig_dir, args))
    kube = []
    if kubeconfig is not None or in_cluster:
        path = str(kubeconfig) if kubeconfig is not None else None
        kube = [check_collect.kube_probe(path, c) for c in (contexts or (None,))]
    facts = asyncio.run(
        check_collect.collect(
            etcd_endpoints.split(","), controller_admins, kube=kube, timeout=timeout
        )
    )
    results = checks.evaluate(facts, time.time(), checks.Bounds(root_warn=warn_days * 86400))
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    else:
        click.echo(checks.render(results))
    sys.exit(1 if checks.failed(results) else 0)


def _in_rig(rig_dir: Path, args: list[str]) -> int:
    """Re-run with the same arguments inside the rig, naming each controller replica."""
    return rerun_in_rig(
        rig_dir,
        ["check", *args],
        lambda layout: [f"--controller-admin={r.admin}" for r in layout.controllers],
    )
