"""Bringing a whole rig up: which processes make a federation, in which namespace, with what.

`lifecycle` builds namespaces and runs commands; this module knows the cast: a real etcd and the
controller in the control netns; per cluster its CA roots, agent and gateway; per pod a join
token, a sidecar and a workload. Processes are `fedgate ...` subcommands started by argv (this
package never imports the components it starts), so every rig process is exactly what an
operator would run. It does not decide anything about routing: it writes exports and policies.
"""

from __future__ import annotations

import datetime as dt
import secrets
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ca import cadir
from ca.authority import DEFAULT_SVID_TTL, CertificateAuthority
from ca.bootstrap import Bootstrap
from ca.verify import utcnow
from clusters import source
from clusters.rig import (
    config_repo,
    control,
    lifecycle,
    ready,
    restart,
    supervisor,
    topology,
)
from clusters.rig.ready import endpoints_seen as endpoints_seen
from clusters.rig.ready import sidecar_config as sidecar_config
from clusters.rig.ready import wait_pod_ready as wait_pod_ready
from clusters.rig.ready import wait_routes as wait_routes
from clusters.rig.restart import NO_RESTARTS, RestartPolicy
from mesh.model import ServicePort
from mesh.naming import DEFAULT_FEDERATION_DOMAIN, SYSTEM_NAMESPACE, trust_domain_for

DEMO_NAMESPACE = "demo"
ECHO_PORT = 8080
LEASE_TTL = 5
# The gateways' tunnel transport (DESIGN: tls by default); quic and passthrough are the others.
DEFAULT_TRANSPORT = "tls"
PASSTHROUGH_PORT = topology.TUNNEL_PORT + 1  # TCP, on the cluster's WAN address
READY_TIMEOUT = 60.0

# The GitOps sync polls the rig's config repository this often (seconds); it is local, so cheap.


@dataclass(frozen=True, slots=True)
class RigCommand:
    """How to start processes: the `fedgate` command and the etcd binary. `otlp_endpoint`:
    where gateways and sidecars export traces (`--otlp-endpoint`; in their argv, so a
    restarted process keeps it); "" (the default): tracing off. `unix:/path` works from every
    namespace: network namespaces do not isolate the filesystem."""

    fedgate: tuple[str, ...]
    etcd: str
    otlp_endpoint: str = ""

    @property
    def telemetry_args(self) -> list[str]:
        return ["--otlp-endpoint", self.otlp_endpoint] if self.otlp_endpoint else []


Progress = Callable[[str], None]

# The cluster's netns -> the kubeconfig of a Kubernetes API its agent reads (see `up`).
KubeApi = Callable[[str], Path]


def ca_dir(rigdir: Path, name: str) -> Path:
    return rigdir / "ca" / name


def identity_dir(rigdir: Path, cluster: str, pod: str) -> Path:
    return rigdir / "identities" / cluster / pod


def config_dir(rigdir: Path) -> Path:
    return rigdir / "config"


def _addr(hp: tuple[str, int]) -> str:
    return f"{hp[0]}:{hp[1]}"


def _issue_bootstrap(
    rigdir: Path, cluster: str, who: str, namespace: str, service_account: str
) -> Path:
    """A join token granting (namespace, service account), written where only `who` reads it."""
    token = secrets.token_urlsafe(24)
    source.add_token(source.tokens_path(rigdir, cluster), token, namespace, service_account)
    directory = identity_dir(rigdir, cluster, who)
    Bootstrap(
        token=token,
        # Every root the CA publishes (during a rotation: old and new).
        cluster_root_pem=cadir.anchors_pem(ca_dir(rigdir, cluster), utcnow()),
        control_root_pem=(ca_dir(rigdir, "control") / "root.pem").read_bytes(),
        trust_domain=trust_domain_for(cluster),
    ).write(directory)
    return directory


def up(
    rigdir: Path,
    clusters: int,
    command: RigCommand,
    prefix: str = topology.DEFAULT_PREFIX,
    progress: Progress = print,
    svid_ttl: int = 0,
    etcd_members: int = 1,
    controllers: int = 2,
    transport: str = DEFAULT_TRANSPORT,
    kube_api: Mapping[str, KubeApi] | None = None,
    restart_policy: RestartPolicy = NO_RESTARTS,
    pod_cidr_overlap: bool = False,
) -> None:
    """Build the rig and start the whole federation on it; returns once calls can flow, a
    controller leads and every cluster is Live in its view (`ready.wait_leader`).

    `transport` (tls, quic or passthrough): what every cluster's agent publishes for its
    gateway, so what the gateways use between them. Every gateway listens for all three
    (tls on TCP and quic on UDP at the tunnel port, passthrough on TCP `PASSTHROUGH_PORT`).

    `svid_ttl` (seconds, 0: 1 h): the cluster CAs' longest SVID lifetime, and what every
    gateway and sidecar asks for (tests use ~20 s to watch renewals and rotations).

    `kube_api`: the clusters whose agents read a Kubernetes API (`--source kubernetes`) instead
    of their exports.json. Each function is called with the cluster's netns once it exists,
    before the agent starts there, and returns a kubeconfig the agent can use from that netns.
    The rig writes nothing into that API: its server describes the cluster's pods and answers
    TokenReview for their join tokens (docs/kubernetes.md, "On the rig").

    `restart_policy` (default Never, for tests that kill processes on purpose; the CLI's
    default is Always): a supervisor restarts dead processes once the rig is ready
    (clusters/rig/supervisor.py). `pod_cidr_overlap`: north shares west's pod subnet."""
    started = time.monotonic()
    state = lifecycle.up(rigdir, clusters, prefix, pod_cidr_overlap)
    _svid_ttl_file(rigdir).write_text(f"{svid_ttl}\n")
    _otlp_file(rigdir).write_text(command.otlp_endpoint)
    restart.save(rigdir, restart_policy)
    progress(f"namespaces ready for {', '.join(c.name for c in state.clusters)}")
    try:
        _start_control_plane(
            rigdir, command, state.prefix, control.layout(state.prefix, etcd_members, controllers)
        )
        for c in state.clusters:
            kube = (kube_api or {}).get(c.name)
            netns = topology.cluster(state.prefix, c.index).netns
            kubeconfig = kube(netns) if kube is not None else None
            _start_cluster(rigdir, command, state.prefix, c.name, c.index, transport, kubeconfig)
        for c in state.clusters:
            add_pod(rigdir, command, c.name, "client", DEMO_NAMESPACE, "client", None, None)
            add_pod(
                rigdir,
                command,
                c.name,
                "echo-1",
                DEMO_NAMESPACE,
                "echo",
                [
                    *command.fedgate,
                    "echo",
                    "--cluster",
                    c.name,
                    "--pod",
                    "echo-1",
                    "--port",
                    str(ECHO_PORT),
                ],
                (f"echo.{DEMO_NAMESPACE}", ServicePort("http", ECHO_PORT, "HTTP")),
                wait=False,
            )
        for c in state.clusters:
            for pod in ("client", "echo-1"):
                wait_pod_ready(rigdir, c.name, pod)
            ready.wait_http(
                state.plan(c.name).netns,
                f"http://127.0.0.1:{topology.GATEWAY_ADMIN_PORT}/readyz",
                rigdir,
                f"{c.name}-gateway",
            )
        for c in state.clusters:
            ready.export_ready_pod(rigdir, c.name, "echo-1")
        wait_routes(rigdir, "echo", DEMO_NAMESPACE, len(state.clusters))
        lead = ready.wait_leader(rigdir)
        if restart_policy.restarts:
            supervisor.start(rigdir, command.fedgate)
    except BaseException:
        progress("rig up failed; logs are in " + str(lifecycle.logs_dir(rigdir)))
        raise
    progress(
        f"leader {lead.leader} elected; clusters {', '.join(sorted(lead.clusters))} live; "
        f"restart policy {restart_policy.policy}"
    )
    progress(f"rig up in {time.monotonic() - started:.1f} s")


def _start_control_plane(
    rigdir: Path, command: RigCommand, prefix: str, plan: control.ControlLayout
) -> None:
    now = utcnow()
    CertificateAuthority.create(DEFAULT_FEDERATION_DOMAIN, now).save(ca_dir(rigdir, "control"))
    # GitOps: the rig's config repository is the source of truth (echo.demo local 70 / remote
    # 30); the config directory stays empty (it would only seed etcd before the first commit).
    config_dir(rigdir).mkdir(parents=True, exist_ok=True)
    (config_dir(rigdir) / "echo.yaml").unlink(missing_ok=True)
    repo = config_repo.create(rigdir, [(c.name, c.name) for c in lifecycle.load(rigdir).clusters])
    # etcd members and controller replicas: clusters.rig.control.
    control.start(
        rigdir,
        command.etcd,
        command.fedgate,
        plan,
        ca_dir(rigdir, "control"),
        config_dir(rigdir),
        repo,
    )


def _svid_ttl_file(rigdir: Path) -> Path:
    return rigdir / "svid-ttl"


def _svid_ttl(rigdir: Path) -> int:
    try:
        return int(_svid_ttl_file(rigdir).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _otlp_file(rigdir: Path) -> Path:
    return rigdir / "otlp-endpoint"


def _rig_otlp(rigdir: Path) -> str:
    try:
        return _otlp_file(rigdir).read_text().strip()
    except OSError:
        return ""


def _identity_args(rigdir: Path) -> list[str]:
    """`--svid-ttl N` for gateways and sidecars when the rig was brought up with one."""
    ttl = _svid_ttl(rigdir)
    return ["--svid-ttl", str(ttl)] if ttl else []


def _start_cluster(
    rigdir: Path,
    command: RigCommand,
    prefix: str,
    name: str,
    index: int,
    transport: str = DEFAULT_TRANSPORT,
    kubeconfig: Path | None = None,
) -> None:
    plan = lifecycle.load(rigdir).plan(name)  # its pod network may be another's (overlap)
    passthrough = (plan.wan_ip, PASSTHROUGH_PORT)
    published = passthrough if transport == "passthrough" else plan.tunnel_address
    td = trust_domain_for(name)
    # A fresh CA per rig (the directory layout of ca.cadir: root rotation works on it).
    shutil.rmtree(ca_dir(rigdir, name), ignore_errors=True)
    ttl = _svid_ttl(rigdir)
    source_args = (
        ["--source", "kubernetes", "--kubeconfig", str(kubeconfig)]
        if kubeconfig is not None
        else [
            *("--exports", str(source.exports_path(rigdir, name))),
            *("--tokens", str(source.tokens_path(rigdir, name))),
        ]
    )
    cadir.init_ca_dir(
        ca_dir(rigdir, name),
        td,
        utcnow(),
        max_svid_ttl=dt.timedelta(seconds=ttl) if ttl else DEFAULT_SVID_TTL,
    )
    lifecycle.start_process(
        rigdir,
        f"{name}-agent",
        plan.netns,
        [
            *command.fedgate,
            "agent",
            "--cluster",
            name,
            "--etcd",
            control.load(rigdir, prefix).etcd_arg,
            "--ca-dir",
            str(ca_dir(rigdir, name)),
            "--ca-listen",
            _addr(plan.agent_ca_address),
            *source_args,
            "--gateway-tunnel",
            _addr(published),
            "--transport",
            transport,
            "--gateway-egress",
            _addr(plan.egress_address),
            "--admin",
            _addr(plan.agent_admin_address),
            "--lease-ttl",
            str(LEASE_TTL),
        ],
    )
    ident = _issue_bootstrap(rigdir, name, "gateway", SYSTEM_NAMESPACE, "gateway")
    lifecycle.start_process(
        rigdir,
        f"{name}-gateway",
        plan.netns,
        [
            *command.fedgate,
            "gateway",
            "--cluster",
            name,
            "--identity-dir",
            str(ident),
            "--ca",
            _addr(plan.agent_ca_address),
            "--controller",
            control.load(rigdir, prefix).controllers_arg,
            "--tunnel-listen",
            _addr(plan.tunnel_address),
            "--passthrough-listen",
            _addr(passthrough),
            "--egress-listen",
            _addr(plan.egress_address),
            "--admin",
            _addr(plan.gateway_admin_address),
            *command.telemetry_args,
            "--metrics-listen",
            _addr(plan.gateway_metrics_address),
            *_identity_args(rigdir),
        ],
    )


def add_pod(
    rigdir: Path,
    command: RigCommand,
    cluster: str,
    pod: str,
    namespace: str,
    service_account: str,
    workload: Sequence[str] | None,
    export: tuple[str, ServicePort] | None,
    wait: bool = True,
) -> None:
    """A pod with its sidecar and optionally a workload; exported once it is ready."""
    state = lifecycle.load(rigdir)
    record = lifecycle.add_pod(rigdir, cluster, pod, namespace, service_account)
    ident = _issue_bootstrap(rigdir, cluster, pod, namespace, service_account)
    cplan = state.plan(cluster)
    # The rig's tracing endpoint, also for pods added later by a command that did not get it.
    command = replace(command, otlp_endpoint=command.otlp_endpoint or _rig_otlp(rigdir))
    lifecycle.start_process(
        rigdir,
        f"{cluster}-{pod}-sidecar",
        record.netns,
        [
            *command.fedgate,
            "sidecar",
            "--cluster",
            cluster,
            "--pod",
            pod,
            "--namespace",
            namespace,
            "--identity-dir",
            str(ident),
            "--ca",
            _addr(cplan.agent_ca_address),
            "--controller",
            control.load(rigdir, state.prefix).controllers_arg,
            "--admin",
            f"127.0.0.1:{topology.SIDECAR_ADMIN_PORT}",
            *_identity_args(rigdir),
            *command.telemetry_args,
        ],
    )
    if workload:
        lifecycle.start_process(rigdir, f"{cluster}-{pod}", record.netns, list(workload))
    if export is not None:
        service, port = export
        svc, _, ns = service.partition(".")
        path = source.exports_path(rigdir, cluster)
        source.add_export(path, ns, svc, [port])
        ready.add_pending(rigdir, cluster, pod, ns, svc, port.port)
    if wait:
        wait_pod_ready(rigdir, cluster, pod)
        if export is not None:
            ready.export_ready_pod(rigdir, cluster, pod)


# A stock Redis with no persistence: the rig's example of a non-HTTP workload a user brings.
REDIS_ARGV = (
    "redis-server",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--protected-mode",
    "no",
)


def add_redis(rigdir: Path, command: RigCommand, cluster: str, endpoints: int = 1) -> None:
    """Pod `<cluster>/redis` running Redis, exported as redis.demo:6379; returns once every
    client routes redis.demo to `endpoints` endpoints (this one and any added before)."""
    add_pod(
        rigdir,
        command,
        cluster,
        "redis",
        DEMO_NAMESPACE,
        "redis",
        list(REDIS_ARGV),
        (f"redis.{DEMO_NAMESPACE}", ServicePort("tcp", 6379, "TCP")),
    )
    wait_routes(rigdir, "redis", DEMO_NAMESPACE, endpoints)
