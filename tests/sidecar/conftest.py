"""Shared fixtures: per-run PKI (east and west roots) and hand-built snapshots."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop
from structlog.testing import capture_logs

from ca.authority import CertificateAuthority, Svid
from ca.bundle import TrustBundle
from mesh.model import (
    ClusterInfo,
    ClusterWeight,
    Endpoint,
    GatewayAddress,
    MergedService,
    ServicePort,
    Snapshot,
    TrafficPolicy,
)
from mesh.naming import ServiceKey, SpiffeId
from sidecar.tlsio import TlsSession

EAST = "east.fedgate.local"
WEST = "west.fedgate.local"
PAYMENTS = ServiceKey("shop", "payments")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Proxy tests run on asyncio and on uvloop (what fedgate runs in production)."""
    if item.path.name in (
        "test_proxy.py",
        "test_smux.py",
        "test_smux_sidecar.py",
        "test_writes.py",
    ):
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


Logs = list[MutableMapping[str, Any]]


@pytest.fixture
def logs() -> Iterator[Logs]:
    """Every structlog entry the test emits (structlog's own capture)."""
    with capture_logs() as captured:
        yield captured


def spiffe(trust_domain: str, sa: str, ns: str = "shop") -> SpiffeId:
    return SpiffeId(trust_domain, ns, sa)


@dataclass
class Pki:
    east: CertificateAuthority
    west: CertificateAuthority
    rogue_east: CertificateAuthority  # claims the east trust domain, not in any bundle
    now: dt.datetime

    @property
    def bundle(self) -> TrustBundle:
        return TrustBundle.from_pem({EAST: [self.east.root_pem], WEST: [self.west.root_pem]})

    def bundle_map(self) -> dict[str, tuple[str, ...]]:
        return {EAST: (self.east.root_pem.decode(),), WEST: (self.west.root_pem.decode(),)}

    def svid(self, ca: CertificateAuthority, spiffe_id: SpiffeId) -> Svid:
        return ca.issue(spiffe_id, self.now)


def new_pki() -> Pki:
    """Fresh CAs for both trust domains and a rogue east one (benches use it too)."""
    now = dt.datetime.now(dt.UTC)
    return Pki(
        east=CertificateAuthority.create(EAST, now),
        west=CertificateAuthority.create(WEST, now),
        rogue_east=CertificateAuthority.create(EAST, now),
        now=now,
    )


@pytest.fixture(scope="session")
def pki() -> Pki:
    return new_pki()


def cluster(name: str, egress: tuple[str, int] | None = ("127.0.0.1", 15443)) -> ClusterInfo:
    gw = None
    if egress is not None:
        gw = GatewayAddress("127.0.0.1", 15444, egress[0], egress[1], "tls")
    return ClusterInfo(name, f"{name}.fedgate.local", gw, ())


def endpoint(cluster_name: str, address: str, pod: str, sa: str = "payments") -> Endpoint:
    return Endpoint(cluster_name, address, pod, spiffe(f"{cluster_name}.fedgate.local", sa))


def snapshot(
    *,
    clusters: tuple[ClusterInfo, ...] = (),
    endpoints: tuple[Endpoint, ...] = (),
    weights: tuple[tuple[str, int], ...] = (),
    vip: str = "127.77.0.10",
    port: int = 8080,
    version: str = "v1",
    trust_bundle: dict[str, tuple[str, ...]] | None = None,
    service: ServiceKey = PAYMENTS,
) -> Snapshot:
    svc = MergedService(
        key=service,
        vip=vip,
        ports=(ServicePort("http", port),),
        clusters=tuple(sorted({e.cluster for e in endpoints})),
        endpoints=endpoints,
    )
    policies: tuple[TrafficPolicy, ...] = ()
    if weights:
        policies = (TrafficPolicy(service, tuple(ClusterWeight(c, w) for c, w in weights)),)
    return Snapshot(
        version=version,
        clusters=clusters,
        services=(svc,),
        policies=policies,
        trust_bundle=trust_bundle or {},
    )


def tls_in_memory(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[TlsSession, TlsSession]:
    """A client and a server `TlsSession` handshaken back to back in memory."""
    server = TlsSession(server_ctx, True)
    client = TlsSession(client_ctx, False, session)
    for _ in range(4):
        for a, b in ((client, server), (server, client)):
            a.handshake()
            b.feed(a.outgoing())
    assert client.handshake_done
    assert server.handshake_done
    return client, server
