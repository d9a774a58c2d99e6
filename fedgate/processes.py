"""One function per fedgate process: build the adapters, wire them, run until signalled.

Over the 450-line aim: this is the one place that wires concrete adapters together (DESIGN.md:
only fedgate/ wires), one section per process; the agent's optional parts live in their own
modules (agent_election, agent_gateway, identity, inject_webhook, kube_bootstrap).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import REGISTRY
from prometheus_client.core import Metric

from ca.authority import Svid
from ca.bootstrap import Bootstrap
from fedgate import admin, logs, metrics, telemetry
from fedgate.wiring import (
    ProxyWiring,
    parse_hostport,
    run_proxy,
    run_with_loop,
    snapshot_bundle,
    until_signalled,
)
from mesh.interfaces import ClusterSource
from mesh.model import ClusterInfo, GatewayAddress, Snapshot
from mesh.tasks import TaskSet
from mesh.telemetry import Telemetry

if TYPE_CHECKING:
    import grpc

    from ca.service import SelfIssued
    from ca.tokens import TokenAuthenticator
    from clusters.inject.webhook import WebhookServer
    from clusters.kube.writeback import McsWriteBack
    from fedgate.agent_election import LeaderElectionOptions
    from fedgate.etcdopts import EtcdClientOptions
    from fedgate.identity import AgentCA
    from fedgate.inject_webhook import WebhookOptions

_log = structlog.get_logger("fedgate")


# --- controller -----------------------------------------------------------------------------


def controller_credentials(
    svid: Svid | SelfIssued, control_root_pem: bytes, current: Any
) -> grpc.ServerCredentials:
    """mTLS server credentials whose client roots follow the federated trust bundle and whose
    own certificate follows the controller's renewed identity (`ca.service`'s dynamic
    credentials): a cluster that joins later is trusted from its root's arrival on."""
    # Imported here: ca.service is the CA's gRPC server and loads grpc, which a proxy using
    # the h2 client never needs (docs/footprint.md).
    from ca.service import SelfIssued, dynamic_server_credentials

    def serving() -> tuple[Svid, bytes]:
        own = svid.svid if isinstance(svid, SelfIssued) else svid
        snap: Snapshot | None = current()
        return own, control_root_pem + snapshot_bundle(snap).all_roots_pem()

    return dynamic_server_credentials(serving, mutual=True)


# --- agent ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceSettings:
    """Which `ClusterSource` the agent reads: `file` (the `exports` path) or `kubernetes`
    (`kubeconfig`, or the in-cluster ServiceAccount when None). `control_root`: with
    `kubernetes`, the control plane's root PEM for the `fedgate-bootstrap` ConfigMaps."""

    kind: str = "file"
    kubeconfig: Path | None = None
    context: str | None = None
    # Kubernetes only: the replicas' leader election (None: this agent always publishes).
    election: LeaderElectionOptions | None = None
    # Kubernetes only: `<namespace>/<name>` of the gateway's LoadBalancer Service, whose
    # address the agent publishes ("": publish `--gateway-tunnel` only).
    gateway_service: str = ""
    control_root: Path | None = None


def cluster_source(
    settings: SourceSettings, exports: Path, cluster: str, trust_domain: str
) -> tuple[ClusterSource, Callable[[], object], Callable[[], None]]:
    """The source, what it adds to the agent's /config, and how to release it."""
    if settings.kind == "kubernetes":
        from clusters.kube.source import KubeClusterSource

        if settings.kubeconfig is not None:
            kube = KubeClusterSource.from_kubeconfig(
                settings.kubeconfig, cluster, trust_domain, settings.context
            )
        else:
            kube = KubeClusterSource.in_cluster(cluster, trust_domain)
        return kube, kube.stats, kube.close
    from clusters.source import FileClusterSource

    file = FileClusterSource(exports, cluster, trust_domain, poll_interval=0.25)
    return file, lambda: {"file": str(exports)}, lambda: None


def source_identity_and_writeback(
    settings: SourceSettings, source: ClusterSource, tokens: Path | None, cluster: str
) -> tuple[TokenAuthenticator, McsWriteBack | None]:
    """What goes with the source: how the CA authenticates bootstrap tokens, and the MCS
    write-back. Kubernetes: TokenReview of projected ServiceAccount tokens, and ServiceImports
    and ServiceExport conditions written back (one API client for all). The file source: the
    rig's tokens.json (`tokens`, required), and nothing written back."""
    if settings.kind == "kubernetes":
        if tokens is not None:
            # Ignored, not refused: a deployment that passed it while the option was required
            # keeps starting; the warning says it grants nothing.
            _log.warning(
                "--tokens ignored",
                tokens=str(tokens),
                reason="with --source kubernetes the CA checks projected ServiceAccount tokens "
                "with TokenReview",
            )
        from clusters.kube.mcs import rejected_exports
        from clusters.kube.source import KubeClusterSource
        from clusters.kube.tokenreview import TokenReviewAuthenticator
        from clusters.kube.writeback import McsWriteBack

        assert isinstance(source, KubeClusterSource)
        kube = source
        api = kube.api_client
        writeback = McsWriteBack(api, cluster, rejected=lambda: rejected_exports(kube.rejections))
        kube.on_rejections = writeback.poke  # a rejected export's condition does not wait
        return TokenReviewAuthenticator(api), writeback
    from clusters.source import FileTokenAuthenticator

    if tokens is None:
        raise ValueError("the file source needs a tokens file (--tokens)")
    return FileTokenAuthenticator(tokens), None


def agent(
    cluster: str,
    etcd_endpoints: list[str],
    ca_dir: Path,
    ca_listen: str,
    exports: Path,
    tokens: Path | None,
    gateway_tunnel: str,
    gateway_egress: str,
    admin_addr: str,
    lease_ttl: int,
    ca_renew_listen: str = "",
    transport: str = "tls",
    source: SourceSettings = SourceSettings(),
    webhook: WebhookOptions | None = None,
    etcd: EtcdClientOptions | None = None,
) -> None:
    logs.configure("agent", cluster)
    run_with_loop(
        _agent(
            cluster,
            etcd_endpoints,
            ca_dir,
            ca_listen,
            exports,
            tokens,
            gateway_tunnel,
            gateway_egress,
            admin_addr,
            lease_ttl,
            ca_renew_listen,
            transport,
            source,
            webhook,
            etcd,
        )
    )


async def _agent(
    cluster: str,
    etcd_endpoints: list[str],
    ca_dir: Path,
    ca_listen: str,
    exports: Path,
    tokens: Path | None,
    gateway_tunnel: str,
    gateway_egress: str,
    admin_addr: str,
    lease_ttl: int,
    ca_renew_listen: str = "",
    transport: str = "tls",
    source_settings: SourceSettings = SourceSettings(),
    webhook_options: WebhookOptions | None = None,
    etcd: EtcdClientOptions | None = None,
) -> None:
    from ca import service as ca_service
    from clusters.agent import Agent
    from clusters.leadership import GatedPublisher, LeaderTasks
    from federation import denied
    from federation.etcd import open_client
    from federation.merged_feed import EtcdMergedCatalog
    from federation.store import EtcdCatalogPublisher
    from fedgate.identity import AgentCA

    ca = AgentCA(ca_dir)  # the CA directory, reloaded on change (root rotation)
    source, source_status, close_source = cluster_source(
        source_settings, exports, cluster, ca.trust_domain
    )
    authenticator, writeback = source_identity_and_writeback(
        source_settings, source, tokens, cluster
    )
    kube_api = getattr(source, "api_client", None)  # the Kubernetes source's client (or None)
    bootstrap = None
    if writeback is not None:  # the Kubernetes source (its API client)
        from clusters.kube.source import KubeClusterSource
        from fedgate import kube_bootstrap

        assert isinstance(source, KubeClusterSource)
        bootstrap = kube_bootstrap.writer(source.api_client, ca, source_settings.control_root)
    ca_server = await ca_service.serve(
        ca.view, authenticator, ca_listen, renew_listen=ca_renew_listen or None, denied=ca.denied
    )
    # No --gateway-tunnel: only with --gateway-service, which fills it in (agent_gateway).
    th, tp = parse_hostport(gateway_tunnel) if gateway_tunnel else ("", 0)
    eh, ep = parse_hostport(gateway_egress)
    info = ClusterInfo(
        name=cluster,
        trust_domain=ca.trust_domain,
        # `transport`: what peers use to reach this cluster's gateway (`gateway_tunnel` is
        # that transport's listener: TCP for tls and passthrough, UDP for quic).
        gateway=GatewayAddress(th, tp, eh, ep, transport),
        roots=ca.published_roots(),
    )
    client = await open_client(etcd_endpoints, **(etcd.connect_kwargs() if etcd else {}))

    def etcd_publisher() -> EtcdCatalogPublisher:
        return EtcdCatalogPublisher(client, cluster, ttl=lease_ttl)

    election = source_settings.election if source_settings.kind == "kubernetes" else None
    gated = GatedPublisher(etcd_publisher) if election is not None else None
    leader_tasks = LeaderTasks()
    publisher = gated or etcd_publisher()
    the_agent = Agent(info, source, publisher)
    lease_election = None
    if election is not None and gated is not None:
        from fedgate.agent_election import elect

        lease_election = elect(election, kube_api, gated, leader_tasks)
    host, port = parse_hostport(admin_addr)
    admin_server = await admin.serve(
        admin.AdminState(
            ready=lambda: the_agent.published,
            config=lambda: {
                **the_agent.status(),
                "ca": ca.status(),
                "source": source_status(),
                "writeBack": writeback.status() if writeback is not None else None,
                "leaderElection": lease_election.status() if lease_election else None,
                "bootstrap": bootstrap.status() if bootstrap is not None else None,
            },
        ),
        host,
        port,
    )

    def families() -> Iterator[Metric]:
        yield from metrics.certificate_families(
            metrics.roots_of({ca.trust_domain: ca.published_roots()})
        )

    collector = metrics.register(families)
    tasks = TaskSet("agent")
    follow = source_settings.gateway_service if source_settings.kind == "kubernetes" else ""
    if follow:
        from clusters.kube.gateway_service import GatewayServiceWatcher, parse_service_ref
        from fedgate.agent_gateway import follow_gateway, when_ready

        watcher = GatewayServiceWatcher(kube_api, *parse_service_ref(follow))
        ready = asyncio.Event()
        fallback = (th, tp) if gateway_tunnel else None
        tasks.spawn(
            follow_gateway(watcher.changes(), the_agent, fallback, ready, follow), "gateway-service"
        )
        tasks.spawn(when_ready(ready, the_agent), "publish")
    else:
        tasks.spawn(the_agent.run(), "publish")
    webhook = await _start_webhook(webhook_options, cluster, ca, tasks)
    if bootstrap is not None:
        if gated is None:
            tasks.spawn(bootstrap.run(), "bootstrap-configmaps")
        else:  # only the leader writes to the cluster
            leader_tasks.add("bootstrap-configmaps", bootstrap.run)

    async def publish_roots(roots: tuple[str, ...]) -> None:
        if bootstrap is not None:
            bootstrap.poke()  # the ConfigMaps and the webhook's caBundle follow the rotation
        await the_agent.set_info(replace(the_agent.info, roots=roots))

    tasks.spawn(ca.follow(publish_roots), "ca-directory")
    tasks.spawn(denied.follow(client, ca.set_denied), "deny-list")
    if writeback is not None:
        wb = writeback
        if gated is None:
            tasks.spawn(wb.run(EtcdMergedCatalog(client)), "mcs-writeback")
        else:  # only the leader writes to the cluster
            leader_tasks.add("mcs-writeback", lambda: wb.run(EtcdMergedCatalog(client)))
    if lease_election is not None:
        tasks.spawn(lease_election.run(), "leader-election")
    try:
        await until_signalled()
    finally:
        REGISTRY.unregister(collector)
        await tasks.aclose()  # (the election releases the Lease: a follower takes over)
        await leader_tasks.aclose()
        if webhook is not None:
            await webhook.aclose()
        close_source()
        # Without election: revoke the lease, a clean stop leaves routing at once. With it:
        # abandon, so the catalog stays until the next leader overwrites it (or the TTL ends).
        await publisher.aclose()
        await ca_server.stop(None)
        admin_server.close()
        await client.close()


async def _start_webhook(
    options: WebhookOptions | None, cluster: str, ca: AgentCA, tasks: TaskSet
) -> WebhookServer | None:
    """The sidecar-injection webhook (`--webhook-listen`), when asked for."""
    if options is None or not options.listen:
        return None
    from fedgate import inject_webhook

    return await inject_webhook.start(options, cluster, ca.view, tasks)


# --- proxies ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdentityOptions:
    """`--svid-ttl` (seconds, 0: the CA's maximum) and `--ca-renew` ("": CA port + 1)."""

    svid_ttl: int = 0
    ca_renew_address: str = ""
    grpc_client: str = "h2"  # --grpc-client / FEDGATE_GRPC_CLIENT: "h2" or "grpcio"


def _proxy_wiring(
    kind: str,
    node_id: str,
    cluster: str,
    identity_dir: Path,
    ca_address: str,
    controller_address: str,
    admin_addr: str,
    identity: IdentityOptions = IdentityOptions(),
) -> ProxyWiring:
    host, port = parse_hostport(admin_addr)
    return ProxyWiring(
        kind=kind,
        node_id=node_id,
        cluster=cluster,
        bootstrap=Bootstrap.load(identity_dir),
        ca_address=ca_address,
        controller_address=controller_address,
        admin_host=host,
        admin_port=port,
        svid_ttl_seconds=identity.svid_ttl,
        ca_renew_address=identity.ca_renew_address,
        grpc_client="grpcio" if identity.grpc_client == "grpcio" else "h2",
    )


def gateway(
    cluster: str,
    identity_dir: Path,
    ca_address: str,
    controller_address: str,
    admin_addr: str,
    tunnel_listen: str,
    egress_listen: str,
    identity: IdentityOptions = IdentityOptions(),
    tunnels: TunnelListeners | None = None,
    otlp_endpoint: str = "",
    metrics_listen: str = "",
    liveness_fd: int | None = None,
    worker_index: int | None = None,
) -> None:
    logs.configure("gateway", cluster)
    if worker_index is not None:
        structlog.contextvars.bind_contextvars(worker=worker_index)
    # Each worker has its own config stream: its own node id, so the controller's per-stream
    # versions and lag (`/streams.json`, metrics) show every worker, not one of them.
    node = f"gateway.{cluster}" if worker_index is None else f"gateway.{cluster}.w{worker_index}"
    w = _proxy_wiring(
        "gateway",
        node,
        cluster,
        identity_dir,
        ca_address,
        controller_address,
        admin_addr,
        identity,
    )
    if metrics_listen:
        w = replace(w, metrics_address=parse_hostport(metrics_listen))
    tel = telemetry.TelemetrySettings("fedgate-gateway", w.node_id, cluster, otlp_endpoint)
    run_with_loop(
        _gateway(w, tunnel_listen, egress_listen, tunnels or TunnelListeners(), tel, liveness_fd)
    )


def gateway_supervisor(
    cluster: str,
    base_argv: list[str],
    admin_addr: str,
    metrics_listen: str,
    workers: int,
    liveness_period: float,
    liveness_failures: int,
    port_step: int = 1,
) -> None:
    """`fedgate gateway --workers N` (N > 1): supervise N gateway workers (fedgate.workers)."""
    from fedgate import workers as w

    logs.configure("gateway-supervisor", cluster)
    try:
        settings = w.SupervisorSettings(workers, liveness_period, liveness_failures)
        for i in range(workers):  # every worker's ports are checked before any starts
            w.worker_argv(base_argv, i, 0, admin_addr, metrics_listen, port_step)
    except ValueError as e:
        raise SystemExit(f"fedgate: {e}") from e
    supervisor = w.Supervisor(
        settings,
        lambda i, fd: w.worker_argv(base_argv, i, fd, admin_addr, metrics_listen, port_step),
    )
    run_with_loop(supervisor.run())


def tune_malloc() -> bool:
    """Keep glibc from mapping and unmapping every buffer of 128 KiB or more.

    The data plane moves 64-256 KiB chunks (socket reads, TLS records joined into frames); by
    default each such allocation is an mmap + page faults + munmap, which made a 256 KiB frame
    cost ~200 µs instead of ~20 µs (docs/transports.md). Larger thresholds keep them on the
    heap; the price is up to ~32 MiB of freed heap kept per process. glibc only; elsewhere a
    no-op. Returns whether it applied."""
    import ctypes

    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(m_mmap_threshold, 4 * 1024 * 1024) == 1
    return bool(mallopt(m_trim_threshold, 32 * 1024 * 1024) == 1 and ok)


WORKER_DRAIN_GRACE = 10.0  # seconds; under fedgate.workers' stop_grace (15)


@dataclass(frozen=True, slots=True)
class TunnelListeners:
    """Which tunnel transports a gateway accepts peers on. `tls`: host:port (TCP), "" for the
    `--tunnel-listen` address, "off" for none; `passthrough`: host:port (TCP) or "" for off
    (it authenticates no peer); `quic`: whether `--tunnel-listen` also serves QUIC (UDP)."""

    tls: str = ""
    passthrough: str = ""
    quic: bool = True
    reuse_port: bool = False


async def _gateway(
    w: ProxyWiring,
    tunnel_listen: str,
    egress_listen: str,
    tunnels: TunnelListeners,
    tel: telemetry.TelemetrySettings,
    liveness_fd: int | None = None,
) -> None:
    from gateway.gateway import Gateway, GatewaySettings

    if liveness_fd is not None:  # a worker of `--workers N`: answer the supervisor's probes
        from fedgate.workers import answer_liveness

        answer_liveness(liveness_fd)
    tune_malloc()
    th, tp = parse_hostport(tunnel_listen)
    eh, ep = parse_hostport(egress_listen)
    tls_port: int | None = None
    if tunnels.tls != "off":
        tls_host, tls_port = parse_hostport(tunnels.tls or tunnel_listen)
        if tls_host != th:
            raise SystemExit("fedgate: every tunnel listener must use the --tunnel-listen host")
    pt_port: int | None = None
    if tunnels.passthrough:
        pt_host, pt_port = parse_hostport(tunnels.passthrough)
        if pt_host != th:
            raise SystemExit("fedgate: every tunnel listener must use the --tunnel-listen host")
    settings = GatewaySettings(
        cluster=w.cluster,
        trust_domain=w.bootstrap.trust_domain,
        tunnel_host=th,
        tunnel_port=tp if tunnels.quic else None,
        tls_port=tls_port,
        passthrough_port=pt_port,
        egress_host=eh,
        egress_port=ep,
        reuse_port=tunnels.reuse_port,
    )
    async with _telemetry(tel) as t:
        gw = Gateway(settings, w.bootstrap.anchors, telemetry=t)
        # A worker drains on SIGTERM (the supervisor's stop): peers are told (GOAWAY), calls in
        # flight get WORKER_DRAIN_GRACE to finish, within the supervisor's stop grace.
        drain = (lambda: gw.drain(WORKER_DRAIN_GRACE)) if liveness_fd is not None else None
        await run_proxy(
            w, gw, lambda: metrics.tunnel_families(w.cluster, gw.link_stats()), stop=drain
        )


@contextlib.asynccontextmanager
async def _telemetry(s: telemetry.TelemetrySettings) -> AsyncIterator[Telemetry]:
    """The process's telemetry; queued spans are flushed (off the loop) when it stops."""
    try:
        t = telemetry.setup(s)
    except ValueError as e:
        raise SystemExit(f"fedgate: {e}") from e
    if s.otlp_endpoint:
        _log.info("tracing on", otlp_endpoint=s.otlp_endpoint)
    try:
        yield t
    finally:
        if isinstance(t, telemetry.ProcessTelemetry):
            await asyncio.to_thread(t.shutdown)


def sidecar(
    cluster: str,
    identity_dir: Path,
    ca_address: str,
    controller_address: str,
    admin_addr: str,
    pod: str,
    namespace: str,
    capture: bool,
    identity: IdentityOptions = IdentityOptions(),
    otlp_endpoint: str = "",
    multiplex: bool = True,
    metrics_listen: str = "",
) -> None:
    logs.configure("sidecar", cluster)
    structlog.contextvars.bind_contextvars(pod=pod)
    from sidecar.capture import drop_to_capture_gid

    if capture:
        # Before any socket exists: everything this process opens (CA, config stream,
        # upstream connections) must bypass the capture, which matches GID 1337.
        drop_to_capture_gid()
    w = _proxy_wiring(
        "sidecar",
        f"{pod}.{cluster}",
        cluster,
        identity_dir,
        ca_address,
        controller_address,
        admin_addr,
        identity,
    )
    if metrics_listen:  # probes and scraping from outside the pod (Kubernetes)
        w = replace(w, metrics_address=parse_hostport(metrics_listen))
    tel = telemetry.TelemetrySettings("fedgate-sidecar", w.node_id, cluster, otlp_endpoint)
    run_with_loop(_sidecar(w, pod, namespace, capture, multiplex, tel))


async def _sidecar(
    w: ProxyWiring,
    pod: str,
    namespace: str,
    capture: bool,
    multiplex: bool,
    tel: telemetry.TelemetrySettings,
) -> None:
    from sidecar.settings import SidecarSettings
    from sidecar.sidecar import Sidecar

    # capture=True: the sidecar installs its iptables rules in the pod netns when it starts.
    settings = SidecarSettings(
        cluster=w.cluster, pod=pod, namespace=namespace, capture=capture, multiplex=multiplex
    )
    async with _telemetry(tel) as t:
        sidecar = Sidecar(settings, w.bootstrap.anchors, telemetry=t)
        await run_proxy(
            w, sidecar, families=lambda: metrics.authz_families(sidecar.inbound.denials)
        )
