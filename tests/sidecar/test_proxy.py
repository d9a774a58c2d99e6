"""Loopback integration: source sidecar outbound -> destination sidecar inbound -> tiny app.

Every test here runs on both the asyncio and the uvloop event loop (see conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import pytest

from ca.authority import Svid
from ca.tls import client_context
from mesh.codec import StreamHeader, encode_header, reply_from_json, split_frame
from sidecar.errors import ConfigRejectedError
from tests.sidecar.conftest import EAST, PAYMENTS, WEST, Logs, Pki, spiffe
from tests.sidecar.loopback import VIP, Rig, start_rig, stop_rig


@pytest.fixture
async def rig(pki: Pki, logs: Logs) -> AsyncIterator[Rig]:
    r = await start_rig(pki)
    try:
        yield r
    finally:
        await stop_rig(r)


async def wait_log(logs: Logs, event: str, **match: Any) -> MutableMapping[str, Any]:
    """The first captured log entry named `event` with the `match` fields (waits up to 5 s)."""
    async with asyncio.timeout(5):
        while True:
            for entry in logs:
                if entry["event"] == event and all(entry.get(k) == v for k, v in match.items()):
                    return entry
            await asyncio.sleep(0.01)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


async def converse(rig: Rig, dst: tuple[str, int], size: int = 2_000_000) -> bytes:
    """Interactive bytes, then a large duplex transfer, then half-close: return the app's tail."""
    reader, writer = await rig.dial(dst)
    try:
        async with asyncio.timeout(20):  # a bug must fail the test, not hang it
            writer.write(b"abc")
            assert await reader.readexactly(3) == b"abc"
            payload = os.urandom(size)

            async def send() -> None:
                for i in range(0, size, 100_000):
                    writer.write(payload[i : i + 100_000])
                    await writer.drain()

            _, echoed = await asyncio.gather(send(), reader.readexactly(size))
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
            writer.write_eof()  # our direction ends; the response must still arrive
            return await reader.read()
    finally:
        await close(writer)


async def test_local_call_flows_both_ways_with_half_close(rig: Rig, logs: Logs) -> None:
    tail = await converse(rig, (VIP, rig.app_port))
    assert tail == b"payments-0:bye"
    accepted = await wait_log(logs, "inbound accepted", pod="payments-0")
    assert accepted["caller"] == "spiffe://east.fedgate.local/ns/shop/sa/client"
    assert accepted["service"] == "payments.shop"
    closed = await wait_log(logs, "outbound closed", pod="client-0")
    assert closed["dst_cluster"] == "east"
    assert closed["peer"] == "spiffe://east.fedgate.local/ns/shop/sa/payments"
    assert closed["bytes_sent"] == 3 + 2_000_000
    assert "reason" not in closed
    assert rig.apps["west"].connections == 0


async def test_remote_call_goes_through_the_gateway_and_keeps_the_caller(
    rig: Rig, logs: Logs
) -> None:
    rig.apply(weights=(("west", 100),))
    tail = await converse(rig, (VIP, rig.app_port), size=300_000)
    assert tail == b"payments-w0:bye"
    [request] = rig.gateway.requests
    assert (request.service, request.port, request.cluster) == (PAYMENTS, rig.app_port, "west")
    # The destination in west sees the real caller from east, through the gateway.
    accepted = await wait_log(logs, "inbound accepted", pod="payments-w0")
    assert accepted["caller"] == "spiffe://east.fedgate.local/ns/shop/sa/client"
    closed = await wait_log(logs, "outbound closed", pod="client-0")
    assert closed["peer"] == "spiffe://west.fedgate.local/ns/shop/sa/payments"
    assert closed["dst_cluster"] == "west"


async def assert_reset(rig: Rig, dst: tuple[str, int]) -> None:
    reader, writer = await rig.dial(dst)
    try:
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(5):
                await reader.read()
    finally:
        await close(writer)


async def test_request_and_eof_sent_before_the_upstream_is_ready(rig: Rig) -> None:
    reader, writer = await rig.dial((VIP, rig.app_port))
    try:
        writer.write(b"hello")
        writer.write_eof()
        async with asyncio.timeout(10):
            assert await reader.read() == b"hellopayments-0:bye"
    finally:
        await close(writer)


async def test_app_reset_propagates_to_the_destination(rig: Rig, logs: Logs) -> None:
    reader, writer = await rig.dial((VIP, rig.app_port))
    writer.write(b"abc")
    async with asyncio.timeout(10):
        assert await reader.readexactly(3) == b"abc"
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # RST from the app
    closed = await wait_log(logs, "outbound closed", pod="client-0")
    assert closed["reason"] == "connection lost"
    inbound = await wait_log(logs, "inbound closed", pod="payments-0")
    assert "reason" in inbound  # the destination saw a failure, not a clean end
    async with asyncio.timeout(5):  # and the destination app's connection was closed
        while True:
            if rig.apps["east"].active == 0:
                break
            await asyncio.sleep(0.01)


async def test_gateway_refusal_resets_the_app_and_logs_the_reason(rig: Rig, logs: Logs) -> None:
    rig.apply(weights=(("west", 100),))
    rig.gateway.refuse = "no healthy endpoint in west"
    await assert_reset(rig, (VIP, rig.app_port))
    failed = await wait_log(logs, "outbound failed", pod="client-0")
    assert failed["reason"] == "gateway refused"
    assert failed["detail"] == "503 no healthy endpoint in west"
    assert failed["service"] == "payments.shop"
    assert failed["dst_cluster"] == "west"
    assert failed["conn"].startswith("client-0/o")


async def test_a_cluster_its_gateway_cannot_reach_is_avoided_by_every_service(
    rig: Rig, logs: Logs
) -> None:
    from tests.sidecar.conftest import endpoint

    rig.apply(weights=(("west", 100),))
    rig.gateway.refuse = "fedgate egress east: tunnel to west: cannot connect"
    rig.gateway.unreachable = True
    # The refusal marks west down; the connection's retry, unseen by the app, goes east.
    assert await converse(rig, (VIP, rig.app_port), size=1000) == b"payments-0:bye"
    retried = await wait_log(logs, "outbound retry", pod="client-0")
    assert retried["reason"] == "peer unreachable"
    assert rig.source.status()["peers_unreachable"] == ["west"]
    # No outlier detection in this policy: the gateway's word alone keeps calls off west.
    rig.apply(weights=(("east", 50), ("west", 50)), version="v2")
    connects = len(rig.gateway.requests)
    for _ in range(12):
        assert await converse(rig, (VIP, rig.app_port), size=1000) == b"payments-0:bye"
    assert len(rig.gateway.requests) == connects
    # Even weighted 100 % to west, calls fail over to east while west is unreachable ...
    rig.apply(weights=(("west", 100),), version="v3")
    assert await converse(rig, (VIP, rig.app_port), size=1000) == b"payments-0:bye"
    assert len(rig.gateway.requests) == connects
    # ... and west as the only cluster is still tried (panic mode): no verdict makes an outage.
    rig.apply(endpoints=(endpoint("west", "127.0.0.3", "payments-w0"),), version="v4")
    await assert_reset(rig, (VIP, rig.app_port))
    assert len(rig.gateway.requests) == connects + 3  # a try and Istio's 2 retries
    failed = await wait_log(logs, "outbound failed", pod="client-0")
    assert (failed["reason"], failed["tries"]) == ("peer unreachable", 3)


async def test_unexpected_server_identity_is_refused(rig: Rig, logs: Logs) -> None:
    from tests.sidecar.conftest import endpoint

    rig.apply(endpoints=(endpoint("east", "127.0.0.2", "payments-0", sa="ledger"),))
    await assert_reset(rig, (VIP, rig.app_port))
    failed = await wait_log(logs, "outbound failed", pod="client-0")
    assert failed["reason"] == "server identity rejected"
    assert "spiffe://east.fedgate.local/ns/shop/sa/payments is not allowed" in failed["detail"]


@pytest.fixture
async def plain_rig(pki: Pki, logs: Logs) -> AsyncIterator[Rig]:
    """The rig with multiplexing off at the source: one connection and handshake per call."""
    r = await start_rig(pki, multiplex=False)
    try:
        yield r
    finally:
        await stop_rig(r)


async def test_a_second_connection_resumes_tls_and_is_still_checked(
    plain_rig: Rig, logs: Logs
) -> None:
    from tests.sidecar.conftest import endpoint

    rig = plain_rig

    sessions = rig.source.outbound.sessions
    local = (("east", 100),)
    rig.apply(weights=local)
    assert await converse(rig, (VIP, rig.app_port), size=1000) == b"payments-0:bye"
    assert (sessions.full, sessions.resumed) == (1, 0)
    # A snapshot that changes routes only keeps the TLS contexts, and the ticket stays good.
    rig.apply(version="v2", weights=local)
    assert await converse(rig, (VIP, rig.app_port), size=1000) == b"payments-0:bye"
    assert (sessions.full, sessions.resumed) == (1, 1)
    closed = [e for e in logs if e["event"] == "outbound closed"]
    assert [e["tls_resumed"] for e in closed] == [False, True]
    callers = [e["caller"] for e in logs if e["event"] == "inbound accepted"]
    assert callers == ["spiffe://east.fedgate.local/ns/shop/sa/client"] * 2
    # Resuming skips no check: the server's identity is verified again and refused here.
    rig.apply(
        version="v3",
        weights=local,
        endpoints=(endpoint("east", "127.0.0.2", "payments-0", sa="ledger"),),
    )
    await assert_reset(rig, (VIP, rig.app_port))
    failed = await wait_log(logs, "outbound failed", pod="client-0")
    assert failed["reason"] == "server identity rejected"
    assert failed["tls_resumed"] is True
    # A new SVID means a new context: its first handshake is a full one.
    rig.apply(version="v4", weights=local)
    rig.source.set_identity(rig.pki.svid(rig.pki.east, spiffe(EAST, "client-v2")))
    assert await converse(rig, (VIP, rig.app_port), size=1000) == b"payments-0:bye"
    assert sessions.full == 2


async def test_non_vip_destination_is_passed_through(rig: Rig, logs: Logs) -> None:
    tail = await converse(rig, ("127.0.0.12", rig.app_port), size=10_000)
    assert tail == b"payments-0:bye"
    closed = await wait_log(logs, "outbound closed", pod="client-0")
    assert closed["mode"] == "passthrough"
    assert not any(e["event"] == "inbound accepted" for e in logs)


async def test_first_bytes_too_few_to_sniff_are_relayed_once_the_wait_ends(
    rig: Rig, logs: Logs
) -> None:
    # "GE" may start an HTTP/1.1 request: the sniff waits out its timeout (100 ms), then the
    # connection is proxied per connection with those bytes still first in line.
    reader, writer = await rig.dial((VIP, rig.app_port))
    try:
        async with asyncio.timeout(10):
            writer.write(b"GE")
            await writer.drain()
            assert await reader.readexactly(2) == b"GE"
            writer.write(b"T / not sniffed any more")
            writer.write_eof()
            assert await reader.read() == b"T / not sniffed any more" + b"payments-0:bye"
    finally:
        await close(writer)
    closed = await wait_log(logs, "outbound closed", pod="client-0")
    assert (closed["dst_cluster"], closed["endpoint"]) == ("east", "127.0.0.2")
    assert closed["bytes_sent"] == 2 + len(b"T / not sniffed any more")
    assert "sniffed_http" not in rig.source.outbound.http.stats


async def test_vip_with_undeclared_port_is_refused(rig: Rig, logs: Logs) -> None:
    await assert_reset(rig, (VIP, 1))
    failed = await wait_log(logs, "outbound failed", pod="client-0")
    assert failed["reason"] == "unknown port"


async def test_a_direct_connection_to_the_outbound_port_is_not_looped(rig: Rig, logs: Logs) -> None:
    await assert_reset(rig, rig.source.outbound.address)
    assert (await wait_log(logs, "outbound failed"))["reason"] == "loop"
    assert rig.source.outbound.total == 0


async def test_no_route_when_no_endpoint_exists(rig: Rig, logs: Logs) -> None:
    rig.apply(endpoints=())
    await assert_reset(rig, (VIP, rig.app_port))
    assert (await wait_log(logs, "outbound failed"))["reason"] == "no route"


# --- inbound refusals: each with its own reason, and no app connection -------------------


async def direct_call(
    rig: Rig, ctx: ssl.SSLContext, port: int | None = None, raw: bytes = b""
) -> bytes:
    """Talk to the east destination's inbound directly with `ctx`; return what comes back."""
    reader, writer = await asyncio.open_connection("127.0.0.2", rig.inbound_port, ssl=ctx)
    try:
        writer.write(raw or encode_header(StreamHeader(PAYMENTS, port or rig.app_port, "east")))
        async with asyncio.timeout(5):
            return await reader.read()
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        await close(writer)


def ctx_for(rig: Rig, svid: Svid | None) -> ssl.SSLContext:
    if svid is not None:
        return client_context(svid, rig.pki.bundle)
    ctx = ssl.create_default_context(cadata=rig.pki.east.root_pem.decode())
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def refusal_cases(pki: Pki) -> dict[str, Svid | None]:
    ago = pki.now - dt.timedelta(hours=3)
    return {
        "no client certificate": None,
        "foreign root": pki.svid(pki.rogue_east, spiffe(EAST, "client")),
        # A west root signing an east identity: valid chain to a bundle root, wrong domain.
        "trust-domain mismatch": pki.svid(pki.west, spiffe(EAST, "client")),
        "expired": pki.east.issue(spiffe(EAST, "client"), ago, dt.timedelta(minutes=1)),
    }


@pytest.mark.parametrize(
    "reason", ["no client certificate", "foreign root", "trust-domain mismatch", "expired"]
)
async def test_inbound_refuses_bad_callers(rig: Rig, logs: Logs, reason: str) -> None:
    svid = refusal_cases(rig.pki)[reason]
    answer = await direct_call(rig, ctx_for(rig, svid))
    refused = await wait_log(logs, "inbound refused", pod="payments-0")
    assert refused["reason"] == reason, refused
    assert b"payments-0" not in answer
    assert rig.apps["east"].connections == 0
    assert rig.east.inbound.refused == 1


async def test_inbound_serves_only_declared_service_ports(rig: Rig, logs: Logs) -> None:
    svid = rig.pki.svid(rig.pki.east, spiffe(EAST, "client"))
    answer = await direct_call(rig, ctx_for(rig, svid), port=15000)
    frame = split_frame(answer)
    assert frame is not None
    reply = reply_from_json(frame[0])
    assert reply.status == 404
    refused = await wait_log(logs, "inbound refused", pod="payments-0")
    assert refused["reason"] == "unknown service"
    assert refused["caller"] == "spiffe://east.fedgate.local/ns/shop/sa/client"
    assert rig.apps["east"].connections == 0


async def test_inbound_refuses_a_malformed_stream_header(rig: Rig, logs: Logs) -> None:
    svid = rig.pki.svid(rig.pki.east, spiffe(EAST, "client"))
    answer = await direct_call(rig, ctx_for(rig, svid), raw=b"GET / HTTP/1.1\r\n\r\n")
    frame = split_frame(answer)
    assert frame is not None
    assert reply_from_json(frame[0]).status == 400
    refused = await wait_log(logs, "inbound refused", pod="payments-0")
    assert refused["reason"] == "malformed stream header"
    assert rig.apps["east"].connections == 0


async def test_app_down_gives_503_and_resets_the_caller(rig: Rig, logs: Logs) -> None:
    await rig.apps["east"].aclose()
    await assert_reset(rig, (VIP, rig.app_port))
    failed = await wait_log(logs, "outbound failed", pod="client-0")
    assert failed["reason"] == "destination refused"
    assert failed["detail"].startswith("503 app unavailable")
    assert (await wait_log(logs, "inbound refused"))["reason"] == "app unavailable"


# --- configuration, identity, status ---------------------------------------------------------


async def test_new_snapshot_applies_to_new_connections_only(rig: Rig, logs: Logs) -> None:
    reader, writer = await rig.dial((VIP, rig.app_port))
    try:
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        rig.apply(weights=(("west", 100),), version="v2")
        assert await converse(rig, (VIP, rig.app_port), size=1000) == b"payments-w0:bye"
        writer.write(b"still here")  # the first connection keeps its route to east
        assert await reader.readexactly(10) == b"still here"
        writer.write_eof()
        assert await reader.read() == b"payments-0:bye"
    finally:
        await close(writer)


async def test_identity_rotation_applies_to_new_connections(rig: Rig, logs: Logs) -> None:
    rig.source.set_identity(rig.pki.svid(rig.pki.east, spiffe(EAST, "client-v2")))
    assert await converse(rig, (VIP, rig.app_port), size=1000) == b"payments-0:bye"
    accepted = await wait_log(logs, "inbound accepted", pod="payments-0")
    assert accepted["caller"] == "spiffe://east.fedgate.local/ns/shop/sa/client-v2"


async def test_bad_trust_bundle_is_rejected_and_the_old_config_kept(rig: Rig) -> None:
    before = rig.source.state()
    bad = rig.snapshot(version="v9", trust_bundle={WEST: ("not a certificate",)})
    with pytest.raises(ConfigRejectedError, match="v9"):
        rig.source.apply(bad)
    assert rig.source.state() is before


async def test_status_and_readiness(rig: Rig, pki: Pki) -> None:
    status = rig.source.status()
    assert status["ready"] is True
    assert status["version"] == "v1"
    assert status["identity"] == "spiffe://east.fedgate.local/ns/shop/sa/client"
    assert status["services"] == [{"name": "payments.shop.svc.clusterset.local", "vip": VIP}]
    assert status["routes"][0]["weights"] == {"east": 1.0}
    assert status["trust_domains"] == {EAST: 1, WEST: 1}
    assert status["gateway"] == f"{rig.egress[0]}:{rig.egress[1]}"
    json.dumps(status)  # the admin endpoint serves it as is
    from sidecar.sidecar import Sidecar

    fresh = Sidecar(rig.source.settings, pki.bundle)
    assert not fresh.ready()
    fresh.set_identity(pki.svid(pki.east, spiffe(EAST, "client")))
    assert not fresh.ready()  # an identity but no snapshot yet


async def test_clusterset_dns_resolves_the_vip(rig: Rig) -> None:
    from sidecar.dns import TYPE_A, Header, Message, Question, decode_message, encode_message

    assert rig.source.dns is not None
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not got.done():
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=rig.source.dns.address)
    try:
        q = Question("payments.shop.svc.clusterset.local", TYPE_A)
        transport.sendto(encode_message(Message(Header(5, rd=True), q)))
        async with asyncio.timeout(5):
            reply = decode_message(await got)
        assert reply.answers[0].data == bytes(int(x) for x in VIP.split("."))
    finally:
        transport.close()
