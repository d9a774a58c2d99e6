"""Fixtures for gateway tests: per-run CAs for east and west, two gateways on loopback, an
echo server standing in for the destination sidecar, and a CONNECT client."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import pytest
import uvloop
from structlog.testing import LogCapture

from ca.authority import CertificateAuthority, Svid
from ca.bundle import TrustBundle
from ca.service import dns_names_for
from gateway.gateway import Gateway, GatewaySettings
from gateway.passthrough import PassthroughSettings
from gateway.tls_tunnel import TlsTunnelSettings
from gateway.transport import TRANSPORTS
from gateway.tunnel import TunnelSettings
from mesh.connect import ConnectRequest, encode_request, parse_response
from mesh.model import (
    ClusterInfo,
    Endpoint,
    GatewayAddress,
    MergedService,
    ServicePort,
    Snapshot,
)
from mesh.naming import ServiceKey, SpiffeId, gateway_identity

EAST_TD = "east.fedgate.local"
WEST_TD = "west.fedgate.local"
ECHO = ServiceKey("demo", "echo")
ECHO_PORT = 7000
LOOPBACK = "127.0.0.1"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The peer-health feed runs on asyncio and on uvloop (what fedgate runs in production:
    uvloop's transports are no asyncio.Transport subclasses)."""
    if item.path.name == "test_peer_feed.py":
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture(scope="session")
def east_ca() -> CertificateAuthority:
    return CertificateAuthority.create(EAST_TD, utcnow())


@pytest.fixture(scope="session")
def west_ca() -> CertificateAuthority:
    return CertificateAuthority.create(WEST_TD, utcnow())


def issue(ca: CertificateAuthority, spiffe_id: SpiffeId) -> Svid:
    return ca.issue(spiffe_id, utcnow(), dns_names=dns_names_for(spiffe_id))


def gateway_svid(ca: CertificateAuthority) -> Svid:
    return issue(ca, gateway_identity(ca.trust_domain))


class EchoServer(asyncio.Protocol):
    """Stands in for the destination sidecar: echoes, and closes after the caller's FIN."""

    connections = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        EchoServer.connections += 1

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close (after flushing), which sends our FIN


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.get_running_loop().create_server(EchoServer, LOOPBACK, 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


def build_snapshot(
    east: Gateway,
    west: Gateway,
    east_ca: CertificateAuthority,
    west_ca: CertificateAuthority,
    version: str = "v1",
    echo_clusters: tuple[str, ...] = ("west",),
    transport: str = "quic",
) -> Snapshot:
    def info(gw: Gateway, ca: CertificateAuthority) -> ClusterInfo:
        t_host, t_port = gw.listen_address(transport)
        e_host, e_port = gw.egress_address
        return ClusterInfo(
            name=gw.settings.cluster,
            trust_domain=ca.trust_domain,
            gateway=GatewayAddress(t_host, t_port, e_host, e_port, transport),
            roots=(ca.root_pem.decode(),),
        )

    endpoints = tuple(
        Endpoint(c, LOOPBACK, f"echo-{c}", SpiffeId(f"{c}.fedgate.local", "demo", "echo"))
        for c in echo_clusters
    )
    return Snapshot(
        version=version,
        clusters=(info(east, east_ca), info(west, west_ca)),
        services=(
            MergedService(
                key=ECHO,
                vip="240.0.0.10",
                ports=(ServicePort("tcp", ECHO_PORT),),
                clusters=echo_clusters,
                endpoints=endpoints,
            ),
            MergedService(
                key=ServiceKey("demo", "empty"),
                vip="240.0.0.11",
                ports=(ServicePort("tcp", ECHO_PORT),),
                clusters=(),
                endpoints=(),
            ),
        ),
        trust_bundle={
            EAST_TD: (east_ca.root_pem.decode(),),
            WEST_TD: (west_ca.root_pem.decode(),),
        },
    )


@dataclass
class Pair:
    east: Gateway
    west: Gateway
    snapshot: Snapshot
    transport: str = "quic"


def make_gateway(
    cluster: str,
    ca: CertificateAuthority,
    inbound_port: int,
    tls: dict[str, Any] | None = None,
    passthrough: dict[str, Any] | None = None,
    max_datagram_size: int = 1350,
    **tunnel: Any,
) -> Gateway:
    """A gateway on loopback listening for every transport (ephemeral ports)."""
    settings = GatewaySettings(
        cluster=cluster,
        trust_domain=ca.trust_domain,
        tunnel_host=LOOPBACK,
        tunnel_port=0,
        tls_port=0,
        passthrough_port=0,
        egress_host=LOOPBACK,
        egress_port=0,
        inbound_port=inbound_port,
        max_datagram_size=max_datagram_size,
        tunnel=replace(TunnelSettings(), handshake_timeout=3.0, reply_timeout=5.0, **tunnel),
        tls=replace(TlsTunnelSettings(), handshake_timeout=3.0, reply_timeout=5.0, **(tls or {})),
        passthrough=replace(PassthroughSettings(), connect_timeout=3.0, **(passthrough or {})),
    )
    anchors = TrustBundle.from_pem({ca.trust_domain: [ca.root_pem]})
    gw = Gateway(settings, anchors)
    gw.set_identity(gateway_svid(ca))
    return gw


async def start_pair(
    east_ca: CertificateAuthority,
    west_ca: CertificateAuthority,
    inbound_port: int,
    transport: str,
    **settings: Any,
) -> Pair:
    east = make_gateway("east", east_ca, inbound_port, **settings)
    west = make_gateway("west", west_ca, inbound_port, **settings)
    await east.start()
    await west.start()
    snapshot = build_snapshot(east, west, east_ca, west_ca, transport=transport)
    east.apply(snapshot)
    west.apply(snapshot)
    return Pair(east, west, snapshot, transport)


async def stop_pair(pair: Pair) -> None:
    await pair.east.aclose()
    await pair.west.aclose()


@pytest.fixture
async def pair(
    logs: LogCapture,
    east_ca: CertificateAuthority,
    west_ca: CertificateAuthority,
    echo_port: int,
) -> AsyncIterator[Pair]:
    """East and west gateways whose peers publish the QUIC transport."""
    p = await start_pair(east_ca, west_ca, echo_port, "quic")
    try:
        yield p
    finally:
        await stop_pair(p)


@pytest.fixture(params=TRANSPORTS)
async def tpair(
    request: pytest.FixtureRequest,
    logs: LogCapture,
    east_ca: CertificateAuthority,
    west_ca: CertificateAuthority,
    echo_port: int,
) -> AsyncIterator[Pair]:
    """The same pair, once per transport (the conformance suite runs on it)."""
    p = await start_pair(east_ca, west_ca, echo_port, request.param)
    try:
        yield p
    finally:
        await stop_pair(p)


async def connect_via(
    gw: Gateway,
    service: ServiceKey = ECHO,
    cluster: str = "west",
    port: int = ECHO_PORT,
    traceparent: str = "",
) -> tuple[int, str, asyncio.StreamReader, asyncio.StreamWriter]:
    """CONNECT through `gw`'s egress as a sidecar would; returns (status, reason, r, w)."""
    host, egress_port = gw.egress_address
    reader, writer = await asyncio.open_connection(host, egress_port)
    writer.write(encode_request(ConnectRequest(service, port, cluster, traceparent)))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status, reason = parse_response(head)
    return status, reason, reader, writer


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
