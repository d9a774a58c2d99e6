"""The tunnel conformance suite: every transport (tls, quic, passthrough) passes the same tests.

Two gateways on loopback; a sidecar-like client CONNECTs to east's egress, east tunnels to west
over the transport west publishes, west's ingress dials the echo server. Model: trio's
`_check_streams.py`: one body of behaviour, run against every implementation. Checks that only
make sense where a transport has the feature (peer authentication) are skipped elsewhere.

Over the 450-line aim: the suite's point is one body of behaviour in one place, run against every
transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator

import pytest
from structlog.testing import LogCapture

from ca.authority import CertificateAuthority, Svid
from gateway.gateway import Gateway
from gateway.tls_tunnel import ALPN as TLS_ALPN
from mesh import mux
from mesh.codec import StreamHeader, encode_header, split_frame
from mesh.connect import (
    ConnectRequest,
    encode_request,
    parse_response,
    response_peer_unreachable,
)
from mesh.naming import ServiceKey, SpiffeId, gateway_identity
from tests.gateway.conftest import (
    EAST_TD,
    ECHO,
    ECHO_PORT,
    LOOPBACK,
    Pair,
    close_writer,
    connect_via,
    gateway_svid,
    issue,
    start_pair,
    stop_pair,
)
from tests.gateway.test_tunnel_robustness import BlackHole
from tests.helpers import until


async def echo_roundtrip(gw: Gateway, payload: bytes = b"ping") -> None:
    status, reason, reader, writer = await connect_via(gw)
    assert status == 200, reason
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
    await close_writer(writer)


# --- streams --------------------------------------------------------------------------------


async def test_stream_opens_with_destination_header_and_echoes(tpair: Pair) -> None:
    status, reason, reader, writer = await connect_via(
        tpair.east, traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    )
    assert status == 200, reason
    writer.write(b"hello fedgate")
    assert await asyncio.wait_for(reader.readexactly(13), 5) == b"hello fedgate"
    await close_writer(writer)
    assert tpair.west.status()["counters"]["ingress"]["calls"] == 1


async def test_half_close_propagates_both_ways(tpair: Pair) -> None:
    status, reason, reader, writer = await connect_via(tpair.east)
    assert status == 200, reason
    writer.write(b"last words")
    writer.write_eof()  # our FIN crosses the tunnel; the echo server answers, then closes
    assert await asyncio.wait_for(reader.read(), 5) == b"last words"  # then EOF from west
    await close_writer(writer)
    await until(lambda: not tpair.west.ingress.active and not tpair.east.egress.active)


async def test_tiny_writes_arrive_in_order(tpair: Pair) -> None:
    status, reason, reader, writer = await connect_via(tpair.east)
    assert status == 200, reason
    sent = bytes(i % 251 for i in range(400))
    for i in range(len(sent)):
        writer.write(sent[i : i + 1])
        await writer.drain()
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == sent
    await close_writer(writer)


async def test_huge_transfer_arrives_intact(tpair: Pair) -> None:
    data = os.urandom(8 * 1024 * 1024)
    status, reason, reader, writer = await connect_via(tpair.east)
    assert status == 200, reason

    async def send() -> None:
        writer.write(data[:1])  # one tiny write first, then big ones
        for i in range(1, len(data), 1024 * 1024):
            writer.write(data[i : i + 1024 * 1024])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    got = await asyncio.wait_for(reader.read(), 40)
    await sender
    await close_writer(writer)
    assert len(got) == len(data)
    assert got == data


async def test_hundreds_of_concurrent_streams(tpair: Pair) -> None:
    async def one(i: int) -> bytes:
        status, reason, reader, writer = await connect_via(tpair.east)
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
    assert tpair.west.status()["counters"]["ingress"]["ok"] == 200
    outbound = tpair.east.status()["outbound"][tpair.transport]
    if tpair.transport == "passthrough":
        assert outbound["connects"] == 200  # one TCP connection per call, by design
        return
    peer = outbound["peers"]["west"]
    assert peer["state"] == "connected"
    assert peer["streams_total"] == 200
    # No handshake per call: a handful of long-lived connections carried all 200.
    limit = 1 if tpair.transport == "quic" else tpair.east.settings.tls.connections_per_peer
    assert outbound["connects"] <= limit
    assert peer["connections"] <= limit


async def test_reset_by_the_caller_releases_both_gateways(tpair: Pair) -> None:
    status, reason, reader, writer = await connect_via(tpair.east)
    assert status == 200, reason
    writer.write(b"x" * 1000)
    await reader.readexactly(1000)
    assert tpair.west.status()["open_streams"]["ingress"] == 1
    writer.transport.abort()  # RST, not FIN
    await until(lambda: tpair.east.status()["open_streams"]["egress"] == 0)
    await until(lambda: tpair.west.status()["open_streams"]["ingress"] == 0)
    await echo_roundtrip(tpair.east)  # the connection (if any) still serves


async def test_reset_by_the_destination_reaches_the_caller(tpair: Pair) -> None:
    status, reason, reader, writer = await connect_via(tpair.east)
    assert status == 200, reason
    writer.write(b"x")
    await reader.readexactly(1)
    (splice,) = tpair.west.ingress.active
    if tpair.transport == "passthrough":
        assert splice.relay is not None, "passthrough relays with os.splice once routed"
    splice.abort("test: the destination side fails")
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    await close_writer(writer)
    await echo_roundtrip(tpair.east)


@pytest.fixture(params=["tls", "quic", "passthrough"])
async def black_hole(
    request: pytest.FixtureRequest,
    logs: LogCapture,
    east_ca: CertificateAuthority,
    west_ca: CertificateAuthority,
) -> AsyncIterator[Pair]:
    server = await asyncio.get_running_loop().create_server(BlackHole, LOOPBACK, 0)
    p = await start_pair(east_ca, west_ca, server.sockets[0].getsockname()[1], request.param)
    try:
        yield p
    finally:
        await stop_pair(p)
        for t in BlackHole.transports:
            t.abort()
        BlackHole.transports.clear()
        server.close()
        await server.wait_closed()


async def test_flow_control_bounds_buffering(black_hole: Pair) -> None:
    status, reason, _, writer = await connect_via(black_hole.east)
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
    await asyncio.sleep(1.5)
    assert not task.done(), "256 MB were accepted: nothing pushes back"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # kernel socket buffers + one stream window + the high-water marks, not everything
    assert accepted < 48 * 1024 * 1024, accepted
    writer.transport.abort()


# --- refusals ---------------------------------------------------------------------------------


async def test_refusals_name_the_hop_and_keep_the_connection(tpair: Pair) -> None:
    status, reason, _, writer = await connect_via(tpair.east, service=ServiceKey("demo", "empty"))
    await close_writer(writer)
    assert (status, reason) == (503, "fedgate ingress west: no healthy endpoint for empty.demo")
    status, reason, _, writer = await connect_via(tpair.east, port=7001)
    await close_writer(writer)
    assert (status, reason) == (503, "fedgate ingress west: echo.demo has no port 7001")
    await echo_roundtrip(tpair.east)


# --- bad input ----------------------------------------------------------------------------------


def tls_client_context(svid: Svid | None, server_ca: CertificateAuthority) -> ssl.SSLContext:
    from ca.tls import _load_svid

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=server_ca.root_pem.decode())
    ctx.check_hostname = False
    ctx.set_alpn_protocols([TLS_ALPN])
    if svid is not None:
        _load_svid(ctx, svid)
    return ctx


async def raw_mux_call(port: int, ctx: ssl.SSLContext, payload: bytes) -> bytes:
    """Speak the mux by hand: open stream 1 with `payload`; return what came back on it."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port, ssl=ctx), 5)
    except (ssl.SSLError, ConnectionError):
        return b""
    conn = mux.MuxConnection(is_client=True)
    sid = conn.open_stream()
    conn.send_data(sid, payload, end_stream=False)
    writer.write(conn.data_to_send())
    got = b""
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                break
            conn.receive_data(data)
            while (event := conn.next_event()) is not None:
                if isinstance(event, mux.StreamData):
                    got += event.data
                    if event.end_stream:
                        return got
                elif isinstance(event, mux.ConnectionFailed | mux.StreamReset):
                    return got
    except (ssl.SSLError, ConnectionError, TimeoutError):
        pass
    finally:
        writer.transport.abort()
    return got


async def test_garbage_input_closes_only_its_connection(
    tpair: Pair, logs: LogCapture, east_ca: CertificateAuthority, west_ca: CertificateAuthority
) -> None:
    host, port = tpair.west.listen_address(tpair.transport)
    # 1. Garbage where a handshake (tls, quic) or a stream header (passthrough) belongs.
    rng = os.urandom
    if tpair.transport == "quic":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(200):
                data = bytearray(rng(1200 if i % 2 else 30))
                if i % 3 == 0:
                    data[0] = 0xC0
                    data[1:5] = b"\x00\x00\x00\x01"
                sock.sendto(bytes(data), (host, port))
    else:
        for size in (1, 100, 5000):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"\x16\x03\x01" + rng(size) if size > 1 else b"\xff")
            writer.write_eof()
            with contextlib.suppress(ConnectionError):
                got = await asyncio.wait_for(reader.read(), 5)
                if tpair.transport == "passthrough" and size > 1:
                    frame = split_frame(got)
                    assert frame is not None
                    assert frame[0]["status"] == 400
            await close_writer(writer)
    # 2. tls: an authenticated peer that breaks the framing loses its connection only.
    if tpair.transport == "tls":
        ctx = tls_client_context(gateway_svid(east_ca), west_ca)
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
        writer.write(mux.FRAME.pack(9, 0, 1, 0))  # unknown frame type
        data = await asyncio.wait_for(reader.read(), 5)
        assert b"unknown frame type" in data
        writer.transport.abort()
        assert any(e["event"] == "tunnel protocol error" for e in logs.entries)
    await asyncio.sleep(0.1)
    await echo_roundtrip(tpair.east, b"still alive")
    assert not [e for e in logs.entries if e.get("log_level") == "error"]


# QUIC's malformed-header case needs a raw aioquic client: tests/gateway/test_tunnel_robustness.
@pytest.mark.parametrize("tpair", ["tls", "passthrough"], indirect=True)
async def test_malformed_stream_header_gets_400_and_other_streams_live(
    tpair: Pair, east_ca: CertificateAuthority, west_ca: CertificateAuthority
) -> None:
    host, port = tpair.west.listen_address(tpair.transport)
    bad = b"FGH1\x00\x05junk!"
    if tpair.transport == "tls":
        ctx = tls_client_context(gateway_svid(east_ca), west_ca)
        got = await raw_mux_call(port, ctx, bad)
    else:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(bad)
        got = await asyncio.wait_for(reader.read(), 5)
        await close_writer(writer)
    frame = split_frame(got)
    assert frame is not None
    assert frame[0]["status"] == 400
    assert "malformed stream header" in frame[0]["reason"]
    await echo_roundtrip(tpair.east)


# --- peer authentication (tls, quic) -------------------------------------------------------


def _identities(
    kind: str, east_ca: CertificateAuthority, west_ca: CertificateAuthority
) -> Svid | None:
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    if kind == "valid":
        return gateway_svid(east_ca)
    if kind == "none":
        return None
    if kind == "foreign-root":
        return gateway_svid(CertificateAuthority.create(EAST_TD, now))
    if kind == "wrong-domain":  # west's trusted root minting the east gateway identity
        return issue(west_ca, gateway_identity(EAST_TD))
    if kind == "not-a-gateway":
        return issue(east_ca, SpiffeId(EAST_TD, "demo", "client"))
    raise AssertionError(kind)


# Passthrough authenticates no peer gateway, by design (docs/transports.md): not generated.
AUTHENTICATING = pytest.mark.parametrize("tpair", ["tls", "quic"], indirect=True)


@AUTHENTICATING
@pytest.mark.parametrize("kind", ["valid", "none", "foreign-root", "wrong-domain", "not-a-gateway"])
async def test_peer_authentication(
    tpair: Pair,
    kind: str,
    east_ca: CertificateAuthority,
    west_ca: CertificateAuthority,
    logs: LogCapture,
) -> None:
    svid = _identities(kind, east_ca, west_ca)
    port = tpair.west.listen_address(tpair.transport)[1]
    header = encode_header(StreamHeader(ECHO, ECHO_PORT, "west"))
    if tpair.transport == "tls":
        got = await raw_mux_call(port, tls_client_context(svid, west_ca), header)
    else:
        from tests.gateway.test_quic_mtls import client_config, try_stream

        got, _ = await try_stream(port, client_config(svid, west_ca))
    refusals = [e for e in logs.entries if e["event"] == "tunnel handshake refused"]
    if kind == "valid":
        frame = split_frame(got)
        assert frame is not None, got
        assert frame[0]["status"] == 200
        assert not refusals
        return
    assert got == b"", f"the west tunnel served a stream: {got!r}"
    await until(lambda: any(e["event"] == "tunnel handshake refused" for e in logs.entries))
    assert tpair.west.status()["counters"]["ingress"]["calls"] == 0
    await echo_roundtrip(tpair.east)  # real peers are still served


@AUTHENTICATING
async def test_client_refuses_a_server_that_is_not_the_expected_gateway(
    tpair: Pair, west_ca: CertificateAuthority, logs: LogCapture
) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from gateway.gateway import _Identity

    impostor = west_ca.issue(
        SpiffeId("west.fedgate.local", "demo", "echo"),
        dt.datetime.now(dt.UTC),
        dns_names=("gateway.west.fedgate.local",),
    )
    certs = x509.load_pem_x509_certificates(impostor.cert_pem)
    key = serialization.load_pem_private_key(impostor.key_pem, None)
    tpair.west._identity = _Identity(impostor, certs[0], (), key)  # type: ignore[arg-type]
    tpair.west._ctx_cache.clear()
    status, reason, _, writer = await connect_via(tpair.east)
    await close_writer(writer)
    assert status == 502, reason
    assert "tunnel to west" in reason
    assert any(
        "spiffe://west.fedgate.local/ns/demo/sa/echo not authorized" in e["reason"]
        for e in logs.entries
        if e["event"] == "tunnel handshake refused"
    )


# --- lifecycle ------------------------------------------------------------------------------------


async def test_graceful_drain_finishes_calls_in_flight(tpair: Pair) -> None:
    status, reason, reader, writer = await connect_via(tpair.east)
    assert status == 200, reason
    writer.write(b"before")
    assert await asyncio.wait_for(reader.readexactly(6), 5) == b"before"
    drain = asyncio.create_task(tpair.west.drain(grace=5.0))
    await asyncio.sleep(0.1)
    # New calls are not served by the draining gateway...
    status2, reason2, _, w2 = await connect_via(tpair.east)
    await close_writer(w2)
    assert status2 in (502, 503), reason2
    # ...while the call in flight goes on to its end.
    writer.write(b"during")
    assert await asyncio.wait_for(reader.readexactly(6), 5) == b"during"
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    await close_writer(writer)
    await asyncio.wait_for(drain, 5)


def vanish(gw: Gateway) -> None:
    """The gateway disappears without a goodbye (a crash or a partition)."""
    if gw._server is not None:
        gw._server._transport.abort()  # type: ignore[union-attr]
    if gw._tls_server is not None:
        assert gw._tls_server._server is not None
        gw._tls_server._server.close()
        for conn in list(gw._tls_server.connections):
            assert conn._transport is not None
            conn._transport.abort()
    if gw._pt_server is not None:
        assert gw._pt_server._server is not None
        gw._pt_server._server.close()
        for stream in list(gw._pt_server.streams):
            stream.reset("vanished")


async def refusal_head(gw: Gateway, service: ServiceKey = ECHO) -> bytes:
    """The head of the egress's answer to a CONNECT for `service` in west."""
    reader, writer = await asyncio.open_connection(*gw.egress_address)
    writer.write(encode_request(ConnectRequest(service, ECHO_PORT, "west")))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    await close_writer(writer)
    return head


async def test_a_peer_that_vanishes_fails_its_calls_only(tpair: Pair) -> None:
    # A refusal about the service says nothing of the link ...
    head = await refusal_head(tpair.east, ServiceKey("demo", "nope"))
    assert parse_response(head)[0] == 503
    assert not response_peer_unreachable(head)
    status, reason, reader, writer = await connect_via(tpair.east)
    assert status == 200, reason
    writer.write(b"x")
    await reader.readexactly(1)
    vanish(tpair.west)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def until_broken() -> None:
        with contextlib.suppress(ConnectionError):
            while True:  # keep sending: QUIC learns of the loss from ICMP, TCP from a reset
                writer.write(b"y" * 1000)
                await writer.drain()
                if not await reader.read(65536):
                    return

    await asyncio.wait_for(until_broken(), 10)
    await close_writer(writer)
    head = await refusal_head(tpair.east)
    status, reason = parse_response(head)
    # 503 once the pool's background re-dial failed too: refused at once (`gateway.pool`).
    assert status in (502, 503, 504), reason
    assert reason.startswith("fedgate egress east: tunnel to west")
    # ... a refusal because the peer's gateway is gone says so, for the sidecars' routing.
    assert response_peer_unreachable(head)
    assert loop.time() - started < 8


async def test_passthrough_without_zero_copy(
    logs: LogCapture, east_ca: CertificateAuthority, west_ca: CertificateAuthority, echo_port: int
) -> None:
    """The copying relay `passthrough` falls back to where os.splice is unavailable."""
    p = await start_pair(
        east_ca, west_ca, echo_port, "passthrough", passthrough={"zero_copy": False}
    )
    try:
        status, reason, reader, writer = await connect_via(p.east)
        assert status == 200, reason
        writer.write(b"copied")
        assert await asyncio.wait_for(reader.readexactly(6), 5) == b"copied"
        (splice,) = p.west.ingress.active
        assert splice.relay is None
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        await close_writer(writer)
    finally:
        await stop_pair(p)


@pytest.mark.parametrize("transport", ["tls", "quic"])
async def test_idle_connections_are_kept_alive_and_measure_rtt(
    transport: str,
    logs: LogCapture,
    east_ca: CertificateAuthority,
    west_ca: CertificateAuthority,
    echo_port: int,
) -> None:
    fast = {"idle_timeout": 1.0, "keepalive_interval": 0.3}
    p = await start_pair(east_ca, west_ca, echo_port, transport, tls=fast, **fast)
    try:
        await echo_roundtrip(p.east)
        await asyncio.sleep(2.0)  # well past the idle timeout
        await echo_roundtrip(p.east)
        outbound = p.east.status()["outbound"][transport]
        assert outbound["losses"] == 0
        assert outbound["connects"] <= p.east.settings.tls.connections_per_peer
        rtt = outbound["peers"]["west"]["rtt_ms"]
        assert rtt is not None
        assert 0 < rtt < 1000
    finally:
        await stop_pair(p)
