"""Two gateways on loopback: CONNECT to east egress, QUIC tunnel to west, echo server behind it."""

from __future__ import annotations

import asyncio
import os

from structlog.testing import LogCapture

from mesh.naming import ServiceKey
from tests.gateway.conftest import (
    ECHO,
    Pair,
    close_writer,
    connect_via,
)


async def test_connect_through_tunnel_echoes(pair: Pair) -> None:
    status, reason, reader, writer = await connect_via(
        pair.east, traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    )
    assert status == 200, reason
    writer.write(b"hello fedgate")
    assert await asyncio.wait_for(reader.readexactly(13), 5) == b"hello fedgate"
    await close_writer(writer)


async def test_half_close_propagates_both_ways(pair: Pair) -> None:
    status, reason, reader, writer = await connect_via(pair.east)
    assert status == 200, reason
    writer.write(b"last words")
    writer.write_eof()  # our FIN crosses the tunnel; the echo server answers, then closes
    assert await asyncio.wait_for(reader.read(), 5) == b"last words"  # then EOF from west
    await close_writer(writer)


async def test_many_concurrent_streams_share_one_quic_connection(pair: Pair) -> None:
    async def one(i: int) -> bytes:
        status, reason, reader, writer = await connect_via(pair.east)
        assert status == 200, reason
        payload = f"call {i} ".encode() * 50
        writer.write(payload)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 20)
        await close_writer(writer)
        assert got == payload
        return got

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert len(results) == 200
    status = pair.east.status()
    west_peer = status["outbound"]["peers"]["west"]
    assert west_peer["state"] == "connected"
    assert west_peer["streams_total"] == 200
    assert status["outbound"]["connects"] == 1
    inbound = pair.west.status()["inbound"]
    assert len(inbound) == 1
    assert inbound[0]["peer"] == "east"
    assert inbound[0]["streams_total"] == 200


async def test_large_transfer_arrives_intact(pair: Pair) -> None:
    data = os.urandom(8 * 1024 * 1024)
    status, reason, reader, writer = await connect_via(pair.east)
    assert status == 200, reason

    async def send() -> None:
        for i in range(0, len(data), 256 * 1024):
            writer.write(data[i : i + 256 * 1024])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    got = await asyncio.wait_for(reader.read(), 40)
    await sender
    await close_writer(writer)
    assert len(got) == len(data)
    assert got == data


async def test_no_endpoint_is_503_naming_the_service(pair: Pair, logs: LogCapture) -> None:
    status, reason, _, writer = await connect_via(pair.east, service=ServiceKey("demo", "empty"))
    await close_writer(writer)
    assert status == 503, reason
    assert reason == "fedgate ingress west: no healthy endpoint for empty.demo"
    assert any(
        e["event"] == "ingress call refused" and "empty.demo" in e["reason"] for e in logs.entries
    )


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
    west.ingress._inbound_port = _free_port()
    status, reason, _, writer = await connect_via(pair.east)
    await close_writer(writer)
    assert status == 502
    assert reason.startswith("fedgate ingress west: endpoint 127.0.0.1:")


async def test_reconnects_after_connection_loss(pair: Pair) -> None:
    status, _, _, writer = await connect_via(pair.east)
    await close_writer(writer)
    assert status == 200
    _, conn = pair.east.pool._conns["west"]
    conn.close("test: drop the connection")
    await asyncio.wait_for(conn.wait_closed(), 5)
    status, reason, reader, writer = await connect_via(pair.east)
    assert status == 200, reason
    writer.write(b"again")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"again"
    await close_writer(writer)
    assert pair.east.status()["outbound"]["connects"] == 2


async def test_status_reports_peers_and_counters(pair: Pair) -> None:
    _, _, reader, writer = await connect_via(pair.east)
    writer.write(b"x")
    await reader.readexactly(1)
    east = pair.east.status()
    assert east["cluster"] == "east"
    assert east["identity"] == "spiffe://east.fedgate.local/ns/fedgate-system/sa/gateway"
    assert east["snapshot_version"] == "v1"
    assert east["open_streams"]["egress"] == 1
    assert east["outbound"]["peers"]["west"]["open_streams"] == 1
    await close_writer(writer)
    assert ECHO.name == "echo"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_oversized_traceparent_is_400_not_a_hang(pair: Pair) -> None:
    status, reason, _, writer = await connect_via(pair.east, traceparent="x" * 5000)
    await close_writer(writer)
    assert status == 400
    assert "cannot send the stream header" in reason
