"""Bad input and hard conditions on real sockets: garbage datagrams, malformed stream headers,
aborted callers, slow destinations (bounded buffering), peer shutdown, idle keepalive."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from typing import ClassVar, cast

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
from tests.helpers import until


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


class BlackHole(asyncio.Protocol):
    """A destination that accepts a connection and never reads from it."""

    # A transport that does not read is referenced by nothing else: keep it from being
    # garbage-collected (which would close it with a reset).
    transports: ClassVar[list[asyncio.Transport]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport
        tcp.pause_reading()
        self.transports.append(tcp)


async def test_peer_shutdown_fails_calls_fast(pair: Pair) -> None:
    status, _, _, writer = await connect_via(pair.east)
    await close_writer(writer)
    assert status == 200
    await pair.west.aclose()
    await until(lambda: not any(c.usable for c in pair.east.pools["quic"].connections_to("west")))
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, reason, _, writer = await connect_via(pair.east)
    await close_writer(writer)
    # 503 once the pool's background re-dial has failed: refused at once (`gateway.pool`).
    assert status in (502, 503, 504), reason
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
        assert east.status()["outbound"]["quic"]["connects"] == 1
        assert east.status()["outbound"]["quic"]["losses"] == 0
    finally:
        await east.aclose()
        await west.aclose()
