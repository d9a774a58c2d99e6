"""Two gateways on loopback (QUIC between them): the egress and ingress edges that the
conformance suite (test_conformance.py, every transport) does not cover."""

from __future__ import annotations

import asyncio

from mesh.naming import ServiceKey
from tests.gateway.conftest import (
    ECHO,
    Pair,
    close_writer,
    connect_via,
)
from tests.helpers import free_port


async def test_unknown_service_and_port_are_503(pair: Pair) -> None:
    status, reason, _, writer = await connect_via(pair.east, service=ServiceKey("demo", "nope"))
    await close_writer(writer)
    assert (status, reason) == (503, "fedgate ingress west: unknown service nope.demo")
    status, reason, _, writer = await connect_via(pair.east, port=7001)
    await close_writer(writer)
    assert (status, reason) == (503, "fedgate ingress west: echo.demo has no port 7001")


async def test_unknown_cluster_is_503_from_egress(pair: Pair) -> None:
    status, reason, _, writer = await connect_via(pair.east, cluster="north")
    await close_writer(writer)
    assert (status, reason) == (503, "fedgate egress east: unknown cluster north")


async def test_malformed_connect_is_400(pair: Pair) -> None:
    host, port = pair.east.egress_address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.read(), 5)
    await close_writer(writer)
    assert head.startswith(b"HTTP/1.1 400 fedgate egress east: malformed CONNECT")


async def test_oversized_connect_head_is_400(pair: Pair) -> None:
    host, port = pair.east.egress_address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"CONNECT " + b"a" * 9000)
    head = await asyncio.wait_for(reader.read(), 5)
    await close_writer(writer)
    assert head.startswith(b"HTTP/1.1 400 ")
    # the gateway is still serving
    status, reason, _, writer = await connect_via(pair.east)
    await close_writer(writer)
    assert status == 200, reason


async def test_endpoint_down_is_502(pair: Pair, echo_port: int) -> None:
    west = pair.west
    west.ingress._inbound_port = free_port()
    status, reason, _, writer = await connect_via(pair.east)
    await close_writer(writer)
    assert status == 502
    assert reason.startswith("fedgate ingress west: endpoint 127.0.0.1:")


async def test_reconnects_after_connection_loss(pair: Pair) -> None:
    status, _, _, writer = await connect_via(pair.east)
    await close_writer(writer)
    assert status == 200
    (conn,) = pair.east.pools["quic"].connections_to("west")
    conn.close("test: drop the connection")
    await asyncio.wait_for(conn.wait_closed(), 5)
    status, reason, reader, writer = await connect_via(pair.east)
    assert status == 200, reason
    writer.write(b"again")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"again"
    await close_writer(writer)
    assert pair.east.status()["outbound"]["quic"]["connects"] == 2


async def test_status_reports_peers_and_counters(pair: Pair) -> None:
    _, _, reader, writer = await connect_via(pair.east)
    writer.write(b"x")
    await reader.readexactly(1)
    east = pair.east.status()
    assert east["cluster"] == "east"
    assert east["identity"] == "spiffe://east.fedgate.local/ns/fedgate-system/sa/gateway"
    assert east["snapshot_version"] == "v1"
    assert east["open_streams"]["egress"] == 1
    assert east["outbound"]["quic"]["peers"]["west"]["open_streams"] == 1
    await close_writer(writer)
    assert ECHO.name == "echo"


async def test_oversized_traceparent_is_ignored_not_a_hang(pair: Pair) -> None:
    # W3C Trace Context 3.2.2: an invalid traceparent restarts the trace; it costs no call.
    status, reason, _, writer = await connect_via(pair.east, traceparent="x" * 5000)
    await close_writer(writer)
    assert status == 200, reason
