"""One function per fedgate process: build the adapters, wire them, run until signalled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import structlog

from ca.authority import CertificateAuthority, Svid
from ca.bootstrap import Bootstrap
from ca.bundle import EMPTY_BUNDLE, TrustBundle
from fedgate import admin, logs
from fedgate.wiring import (
    ProxyWiring,
    authorize_peer,
    controller_svid,
    parse_hostport,
    run_proxy,
    run_with_loop,
    until_signalled,
)
from mesh import codec
from mesh.model import ClusterInfo, GatewayAddress, Snapshot
from mesh.tasks import TaskSet

_log = structlog.get_logger("fedgate")


# --- controller -----------------------------------------------------------------------------


def controller_credentials(
    svid: Svid, control_root_pem: bytes, current: Any
) -> grpc.ServerCredentials:
    """mTLS server credentials whose client roots follow the federated trust bundle.

    gRPC asks the fetcher on new handshakes; a cluster that joins later is trusted as soon as
    its root is in the bundle, without restarting the server or dropping streams.
    """
    pair = [(svid.key_pem, svid.cert_pem)]
    last: list[bytes] = [b""]

    def roots() -> bytes:
        snap: Snapshot | None = current()
        bundle = TrustBundle.from_pem(snap.trust_bundle) if snap else EMPTY_BUNDLE
        return control_root_pem + bundle.all_roots_pem()

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        pem = roots()
        if pem == last[0]:
            return None
        last[0] = pem
        return grpc.ssl_server_certificate_configuration(pair, root_certificates=pem)

    initial = roots()
    last[0] = initial
    return grpc.dynamic_ssl_server_credentials(
        grpc.ssl_server_certificate_configuration(pair, root_certificates=initial),
        fetch,  # type: ignore[arg-type]  # grpc documents None as "unchanged"; stubs omit it
        require_client_authentication=True,
    )


def controller(
    etcd_endpoints: list[str], listen: str, admin_addr: str, ca_dir: Path, config_dir: Path
) -> None:
    logs.configure("controller")
    run_with_loop(_controller(etcd_endpoints, listen, admin_addr, ca_dir, config_dir))


async def _controller(
    etcd_endpoints: list[str], listen: str, admin_addr: str, ca_dir: Path, config_dir: Path
) -> None:
    from federation.controller import Controller
    from federation.etcd import open_client
    from federation.policy_file import load_policies
    from federation.server import ConfigDiscoveryServicer, SnapshotPublisher, serve
    from federation.store import EtcdCatalogState

    ca = CertificateAuthority.load(ca_dir)
    svid = controller_svid(ca)
    policies = load_policies(config_dir)
    client = await open_client(etcd_endpoints)
    publisher = SnapshotPublisher()
    ctl = Controller(EtcdCatalogState(client), client, publisher, policies)

    def bundle() -> TrustBundle:
        snap = ctl.current()
        return TrustBundle.from_pem(snap.trust_bundle) if snap else EMPTY_BUNDLE

    servicer = ConfigDiscoveryServicer(publisher, authorize=authorize_peer(bundle))
    server = await serve(servicer, listen, controller_credentials(svid, ca.root_pem, ctl.current))
    state = admin.AdminState(
        ready=lambda: ctl.ready,
        config=lambda: {
            "identity": svid.spiffe_id.uri,
            "subscribers": publisher.subscribers,
            "snapshot": codec.snapshot_to_json(s) if (s := ctl.current()) else None,
        },
    )
    host, port = parse_hostport(admin_addr)
    admin_server = await admin.serve(state, host, port)
    tasks = TaskSet("controller")
    tasks.spawn(ctl.run(), "sync")
    try:
        await until_signalled()
    finally:
        await tasks.aclose()
        await server.stop()
        admin_server.close()
        await client.close()


# --- agent ------------------------------------------------------------------------------------


def agent(
    cluster: str,
    etcd_endpoints: list[str],
    ca_dir: Path,
    ca_listen: str,
    exports: Path,
    tokens: Path,
    gateway_tunnel: str,
    gateway_egress: str,
    admin_addr: str,
    lease_ttl: int,
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
        )
    )


async def _agent(
    cluster: str,
    etcd_endpoints: list[str],
    ca_dir: Path,
    ca_listen: str,
    exports: Path,
    tokens: Path,
    gateway_tunnel: str,
    gateway_egress: str,
    admin_addr: str,
    lease_ttl: int,
) -> None:
    from ca import service as ca_service
    from clusters.agent import Agent
    from clusters.source import FileClusterSource, read_tokens
    from federation.etcd import open_client
    from federation.store import EtcdCatalogPublisher
    from mesh.naming import SpiffeId

    ca = CertificateAuthority.load(ca_dir)

    def resolve(token: str) -> SpiffeId | None:
        grant = read_tokens(tokens).get(token)  # re-read: the rig adds pods while we run
        if grant is None:
            return None
        return SpiffeId(ca.trust_domain, grant.namespace, grant.service_account)

    ca_server = await ca_service.serve(ca, resolve, ca_listen)
    th, tp = parse_hostport(gateway_tunnel)
    eh, ep = parse_hostport(gateway_egress)
    info = ClusterInfo(
        name=cluster,
        trust_domain=ca.trust_domain,
        gateway=GatewayAddress(th, tp, eh, ep, "quic"),
        roots=(ca.root_pem.decode(),),
    )
    client = await open_client(etcd_endpoints)
    publisher = EtcdCatalogPublisher(client, cluster, ttl=lease_ttl)
    source = FileClusterSource(exports, cluster, ca.trust_domain, poll_interval=0.25)
    the_agent = Agent(info, source, publisher)
    host, port = parse_hostport(admin_addr)
    admin_server = await admin.serve(
        admin.AdminState(ready=lambda: the_agent.published, config=the_agent.status), host, port
    )
    tasks = TaskSet("agent")
    tasks.spawn(the_agent.run(), "publish")
    try:
        await until_signalled()
    finally:
        await tasks.aclose()
        await publisher.aclose()  # revoke the lease: a clean stop leaves routing at once
        await ca_server.stop(None)
        admin_server.close()
        await client.close()


# --- proxies ----------------------------------------------------------------------------------


def _proxy_wiring(
    kind: str,
    node_id: str,
    cluster: str,
    identity_dir: Path,
    ca_address: str,
    controller_address: str,
    admin_addr: str,
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
    )


def gateway(
    cluster: str,
    identity_dir: Path,
    ca_address: str,
    controller_address: str,
    admin_addr: str,
    tunnel_listen: str,
    egress_listen: str,
) -> None:
    logs.configure("gateway", cluster)
    w = _proxy_wiring(
        "gateway",
        f"gateway.{cluster}",
        cluster,
        identity_dir,
        ca_address,
        controller_address,
        admin_addr,
    )
    run_with_loop(_gateway(w, tunnel_listen, egress_listen))


async def _gateway(w: ProxyWiring, tunnel_listen: str, egress_listen: str) -> None:
    from gateway.gateway import Gateway, GatewaySettings

    th, tp = parse_hostport(tunnel_listen)
    eh, ep = parse_hostport(egress_listen)
    settings = GatewaySettings(
        cluster=w.cluster,
        trust_domain=w.bootstrap.trust_domain,
        tunnel_host=th,
        tunnel_port=tp,
        egress_host=eh,
        egress_port=ep,
    )
    await run_proxy(w, Gateway(settings, w.bootstrap.anchors))


def sidecar(
    cluster: str,
    identity_dir: Path,
    ca_address: str,
    controller_address: str,
    admin_addr: str,
    pod: str,
    namespace: str,
    capture: bool,
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
    )
    run_with_loop(_sidecar(w, pod, namespace, capture))


async def _sidecar(w: ProxyWiring, pod: str, namespace: str, capture: bool) -> None:
    from sidecar.settings import SidecarSettings
    from sidecar.sidecar import Sidecar

    # capture=True: the sidecar installs its iptables rules in the pod netns when it starts.
    settings = SidecarSettings(cluster=w.cluster, pod=pod, namespace=namespace, capture=capture)
    await run_proxy(w, Sidecar(settings, w.bootstrap.anchors))
