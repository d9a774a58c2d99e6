"""The `fedgate` command: the agent, gateway and sidecar processes here, every other
subcommand in its own `fedgate/cli_*.py` module, imported only when invoked (`_LAZY`).

Arguments are parsed in these modules, once, into settings objects; nothing below fedgate/
reads the environment or the command line.

Over the 450-line aim: the agent's, gateway's and sidecar's options are declared here, one
decorator per option, and share the proxies' option stack.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from fedgate import native_logs
from fedgate.cli_lazy import LazyGroup
from fedgate.etcdopts import EtcdClientOptions, etcd_client_options

# The proxies' gRPC client (CA and config stream); the first is the default: h2 (h2 + protobuf,
# no grpc import: ~15 MiB and 7 threads lighter per proxy, docs/footprint.md); grpcio selectable.
GRPC_CLIENTS = ("h2", "grpcio")

if TYPE_CHECKING:
    from fedgate.agent_election import LeaderElectionOptions
    from fedgate.inject_webhook import WebhookOptions

INJECT_CONFIG_HELP = (
    "The injector's settings (YAML; `fedgate inject --config`, docs/kubernetes.md)."
)


# Subcommands imported when invoked: every process starts through this module, and loads only
# its own command's code.
_LAZY = {
    "controller": ("fedgate.cli_controller", "controller"),  # a controller replica
    "rig": ("fedgate.cli_rig", "rig"),  # the local multi-cluster rig
    "demo": ("fedgate.cli_rig", "demo"),
    "echo": ("fedgate.cli_rig", "echo"),  # the rig's sample workload
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
            click.option(
                "--grpc-client",
                type=click.Choice(GRPC_CLIENTS),
                default=GRPC_CLIENTS[0],
                show_default=True,
                envvar="FEDGATE_GRPC_CLIENT",
                help="The gRPC client for the CA and the config stream: grpcio, or h2 (h2 + "
                "protobuf, no grpc import: lighter, docs/footprint.md).",
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
    grpc_client: str,
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
        identity=processes.IdentityOptions(svid_ttl, ca_renew_address, grpc_client),
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
    grpc_client: str,
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
        identity=processes.IdentityOptions(svid_ttl, ca_renew_address, grpc_client),
        otlp_endpoint=otlp_endpoint,
        metrics_listen=metrics_listen,
    )


if __name__ == "__main__":
    main()
