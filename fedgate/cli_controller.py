"""`fedgate controller`: run a federation controller replica.

Its options are parsed here into settings, as for every process (fedgate/cli.py); the replica
itself is wired in `fedgate.proc_controller.controller`.
"""

from __future__ import annotations

from pathlib import Path

import click

from fedgate import native_logs
from fedgate.etcdopts import EtcdClientOptions, etcd_client_options


@click.command()
@click.option("--etcd", "etcd_endpoints", required=True, help="host:port[,host:port...]")
@etcd_client_options
@click.option("--listen", required=True, help="gRPC config-stream address (mTLS).")
@click.option("--admin", required=True, help="Admin HTTP address (host:port).")
@click.option("--ca-dir", type=click.Path(path_type=Path), required=True)
@click.option(
    "--config-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="TrafficPolicy YAML seeding /fedgate/config/ while no GitOps commit exists.",
)
@click.option("--replica", default="", help="Replica name (default: the --listen address).")
@click.option(
    "--leader-ttl",
    type=click.IntRange(2),
    default=5,
    show_default=True,
    help="Seconds before a dead leader's lease expires and another replica takes over.",
)
@click.option("--config-repo", default=None, help="GitOps repository (path or URL) to follow.")
@click.option("--config-branch", default="main", show_default=True)
@click.option("--config-path", default="", help="Config directory inside the repository.")
@click.option("--config-poll", type=float, default=15.0, show_default=True)
@click.option(
    "--config-workdir",
    type=click.Path(path_type=Path),
    default=Path("/var/lib/fedgate/gitops"),
    show_default=True,
    help="This replica's private clone of the repository.",
)
@click.option(
    "--gateway-metrics-port",
    type=click.IntRange(1, 65535),
    default=15020,
    show_default=True,
    help="Port of each gateway's --metrics-listen, on its published tunnel host: the "
    "topology page (GET /topology on --admin) reads tunnel health and rates there.",
)
@click.option(
    "--detach-grace",
    type=click.FloatRange(0),
    default=300.0,
    show_default=True,
    help="Seconds a cluster whose agent lease expired stays routed on its last catalog "
    "(Detached) before it is removed; 0 removes it with the lease.",
)
@click.option(
    "--agent-lease-ttl",
    type=click.IntRange(1),
    default=10,
    show_default=True,
    help="The agents' --lease-ttl: no cluster is dropped while this replica's etcd session "
    "is younger than it.",
)
def controller(
    etcd_endpoints: str,
    etcd_client: EtcdClientOptions,
    listen: str,
    admin: str,
    ca_dir: Path,
    config_dir: Path | None,
    replica: str,
    leader_ttl: int,
    config_repo: str | None,
    config_branch: str,
    config_path: str,
    config_poll: float,
    config_workdir: Path,
    gateway_metrics_port: int,
    detach_grace: float,
    agent_lease_ttl: int,
) -> None:
    """Run a federation controller replica (run several; one is elected leader)."""
    native_logs.take_over_stderr()  # before grpc is imported
    from federation.gitops.sync import SyncSettings
    from fedgate import proc_controller

    gitops = (
        SyncSettings(config_repo, config_branch, config_path, config_poll, config_workdir)
        if config_repo
        else None
    )
    proc_controller.controller(
        etcd_endpoints.split(","),
        listen,
        admin,
        ca_dir,
        config_dir,
        replica,
        leader_ttl,
        gitops,
        gateway_metrics_port,
        etcd=etcd_client,
        detach_grace=detach_grace,
        agent_lease_ttl=agent_lease_ttl,
    )
