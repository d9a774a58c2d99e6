"""Bad input and hard conditions on real sockets: garbage datagrams, malformed stream headers,
aborted callers, slow destinations (bounded buffering), peer shutdown, idle keepalive."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections.abc import AsyncIterator, Callable
from typing import ClassVar, cast

import pytest
from aioquic.quic.connection import QuicConnection
from structlog.testing import LogCapture

from ca.authority import CertificateAuthority
from mesh.codec import StreamHeader, StreamReply, encode_header, encode_reply, split_frame
from tests.gateway.conftest import (
    ECHO,
    ECHO_PORT,
    LOOPBACK,
    Pair,
    build_snapshot,
    close_writer,
    connect_via,
    gateway_svid,
    make_gateway,
)
from tests.gateway.test_quic_mtls import RawClient, client_config


async def wait_until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {seconds}s")


async def test_garbage_datagrams_are_dropped_and_the_tunnel_lives(
    pair: Pair, logs: LogCapture
) -> None:
    rng = random.Random(7)
    host, port = pair.west.tunnel_address
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(300):
            size = rng.choice([1, 20, 200, 1200, 1350])
            data = bytearray(rng.randbytes(size))
            if i % 3 == 0:
                data[0] = 0xC0  # long header, Initial: reaches the connection code path
                data[1:5] = b"\x00\x00\x00\x01"
            sock.sendto(bytes(data), (host, port))
    await asyncio.sleep(0.2)
    status, reason, reader, writer = await connect_via(pair.east)
    assert status == 200, reason
    writer.write(b"still alive")
    assert await asyncio.wait_for(reader.readexactly(11), 5) == b"still alive"
    await close_writer(writer)
    counters = pair.west.status()["counters"]["tunnel_server"]
    assert counters["datagrams_dropped"] > 0
    assert any(e["event"] == "tunnel datagrams dropped" for e in logs.entries)
    assert not [e for e in logs.entries if e.get("log_level") == "error"]


async def test_malformed_stream_header_gets_400_and_other_streams_live(
    pair: Pair, east_ca: CertificateAuthority, west_ca: CertificateAuthority
) -> None:
    loop = asyncio.get_running_loop()
    config = client_config(gateway_svid(east_ca), west_ca)
    transport, proto = await loop.create_datagram_endpoint(
        lambda: RawClient(QuicConnection(configuration=config)), local_addr=(LOOPBACK, 0)
    )
    client: RawClient = proto
    try:
        client.connect(pair.west.tunnel_address)
        await asyncio.wait_for(client.wait_connected(), 5)
        bad_r, bad_w = await client.create_stream()
        bad_w.write(b"FGH1\x00\x05junk!")
        good_r, good_w = await client.create_stream()
        good_w.write(encode_header(StreamHeader(ECHO, ECHO_PORT, "west")) + b"ping")
        bad = await asyncio.wait_for(bad_r.read(), 5)
        got = split_frame(bad)
        assert got is not None
        assert got[0]["status"] == 400
        assert "malformed stream header" in got[0]["reason"]
        ok_reply = encode_reply(StreamReply(200))
        good = await asyncio.wait_for(good_r.readexactly(len(ok_reply) + 4), 5)
        assert good == ok_reply + b"ping"
        with contextlib.suppress(ValueError, RuntimeError):  # aioquic: stream stopped/gone
            bad_w.close()
        good_w.close()
    finally:
        client.close()
        transport.close()


async def test_aborted_caller_releases_both_gateways(pair: Pair) -> None:
    status, reason, reader, writer = await connect_via(pair.east)
    assert status == 200, reason
    writer.write(b"x" * 1000)
    await reader.readexactly(1000)
    assert pair.west.status()["open_streams"]["ingress"] == 1
    writer.transport.abort()  # RST, not FIN
    await wait_until(lambda: pair.east.status()["open_streams"]["egress"] == 0)
    await wait_until(lambda: pair.west.status()["open_streams"]["ingress"] == 0)
    assert pair.east.status()["outbound"]["peers"]["west"]["open_streams"] == 0


class BlackHole(asyncio.Protocol):
    """A destination that accepts a connection and never reads from it."""

    # A transport that does not read is referenced by nothing else: keep it from being
    # garbage-collected (which would close it with a reset).
    transports: ClassVar[list[asyncio.Transport]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport
        tcp.pause_reading()
        self.transports.append(tcp)


@pytest.fixture
async def black_hole_pair(
    logs: LogCapture, east_ca: CertificateAuthority, west_ca: CertificateAuthority
) -> AsyncIterator[Pair]:
    server = await asyncio.get_running_loop().create_server(BlackHole, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    east = make_gateway("east", east_ca, port)
    west = make_gateway("west", west_ca, port)
    await east.start()
    await west.start()
    snap = build_snapshot(east, west, east_ca, west_ca)
    east.apply(snap)
    west.apply(snap)
    try:
        yield Pair(east, west, snap)
    finally:
        await east.aclose()
        await west.aclose()
        for t in BlackHole.transports:
            t.abort()
        BlackHole.transports.clear()
        server.close()
        await server.wait_closed()


async def test_slow_destination_bounds_buffering(black_hole_pair: Pair) -> None:
    pair = black_hole_pair
    status, reason, _, writer = await connect_via(pair.east)
    assert status == 200, reason
    chunk = os.urandom(256 * 1024)
    accepted = 0

    async def pump() -> None:
        nonlocal accepted
        while accepted < 256 * 1024 * 1024:
            writer.write(chunk)
            await writer.drain()
            accepted += len(chunk)

    task = asyncio.create_task(pump())
    await asyncio.sleep(2.0)
    assert not task.done(), "256 MB were accepted: nothing pushes back"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # kernel socket buffers + one QUIC stream window + the high-water marks, not everything
    assert accepted < 48 * 1024 * 1024, accepted
    east_conn = pair.east.pool._conns["west"][1]
    (stream,) = east_conn.streams.values()
    settings = east_conn.settings
    assert stream.backlog() <= settings.send_high_water + len(chunk)
    writer.transport.abort()


async def test_peer_shutdown_fails_calls_fast(pair: Pair) -> None:
    status, _, _, writer = await connect_via(pair.east)
    await close_writer(writer)
    assert status == 200
    await pair.west.aclose()
    await wait_until(
        lambda: "west" not in pair.east.pool._conns or not pair.east.pool._conns["west"][1].usable
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, reason, _, writer = await connect_via(pair.east)
    await close_writer(writer)
    assert status in (502, 504), reason
    assert reason.startswith("fedgate egress east: tunnel to west")
    assert loop.time() - started < 3.5


async def test_idle_connection_is_kept_alive(
    logs: LogCapture,
    east_ca: CertificateAuthority,
    west_ca: CertificateAuthority,
    echo_port: int,
) -> None:
    east = make_gateway("east", east_ca, echo_port, idle_timeout=1.0, keepalive_interval=0.3)
    west = make_gateway("west", west_ca, echo_port, idle_timeout=1.0, keepalive_interval=0.3)
    await east.start()
    await west.start()
    try:
        snap = build_snapshot(east, west, east_ca, west_ca)
        east.apply(snap)
        west.apply(snap)
        status, _, _, writer = await connect_via(east)
        await close_writer(writer)
        assert status == 200
        await asyncio.sleep(2.5)  # well past the idle timeout
        status, _, _, writer = await connect_via(east)
        await close_writer(writer)
        assert status == 200
        assert east.status()["outbound"]["connects"] == 1
        assert east.status()["outbound"]["losses"] == 0
    finally:
        await east.aclose()
        await west.aclose()
