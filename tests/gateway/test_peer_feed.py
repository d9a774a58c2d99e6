"""Peer health pushed to sidecars (issue 15: "health that does not cost requests").

Real gateways on loopback (`tls` transport) and the sidecar's real feed client
(sidecar.peer_watch) subscribed to east's egress: west's gateway stops, and the sidecar hears
of it within 1 s without a call of its own; west's gateway comes back on the same port, and
the sidecar takes it back once east's probes pass, again without any call deciding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from structlog.testing import LogCapture

from ca.authority import CertificateAuthority
from ca.bundle import TrustBundle
from gateway.gateway import Gateway
from mesh.peerhealth import REQUEST, decode_report, encode_report, is_request
from sidecar.peer_watch import watch_peer_health
from sidecar.routes import Egress
from sidecar.traffic.balance import remote_host
from sidecar.traffic.peers import PeerHealth
from tests.gateway.conftest import (
    close_writer,
    connect_via,
    gateway_svid,
    start_pair,
)
from tests.helpers import until

WEST = remote_host("west")


@contextlib.asynccontextmanager
async def watching(east: Gateway) -> AsyncIterator[PeerHealth]:
    peers = PeerHealth()
    task = asyncio.create_task(
        watch_peer_health(lambda: Egress(*east.egress_address), peers), name="test:peer-watch"
    )
    try:
        await until(lambda: peers.feed, what="the feed connected")
        yield peers
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def revived(old: Gateway, port: int, ca: CertificateAuthority) -> Gateway:
    """A new west gateway listening where `old` did (a restarted process)."""
    settings = replace(old.settings, tls_port=port, tunnel_port=0, passthrough_port=0)
    gw = Gateway(settings, TrustBundle.from_pem({ca.trust_domain: [ca.root_pem]}))
    gw.set_identity(gateway_svid(ca))
    return gw


async def test_a_down_peer_reaches_every_sidecar_at_once_and_probes_bring_it_back(
    logs: LogCapture, east_ca: CertificateAuthority, west_ca: CertificateAuthority, echo_port: int
) -> None:
    p = await start_pair(east_ca, west_ca, echo_port, "tls")
    west: Gateway | None = None
    try:
        status, _, _, writer = await connect_via(p.east)  # east dials west: a pooled link
        assert status == 200
        await close_writer(writer)
        async with watching(p.east) as peers:
            assert peers.healthy(WEST, time.monotonic())
            calls = p.east.egress.counters["calls"]
            _, port = p.west.listen_address("tls")
            await p.west.aclose()  # west's gateway is gone (its agent and pods are fine)
            gone = time.monotonic()
            await until(lambda: not peers.healthy(WEST, time.monotonic()), within=1.0)
            print(f"\nwest unhealthy for the sidecar {time.monotonic() - gone:.2f} s after")
            assert peers.down(time.monotonic()) == ["west"]

            west = revived(p.west, port, west_ca)
            await west.start()
            west.apply(p.snapshot)
            back = time.monotonic()
            # East re-dials in the background (backoff up to 8 s) and trusts the new link
            # after 2 answered probes (1 s apart): no call is made meanwhile.
            await until(lambda: peers.healthy(WEST, time.monotonic()), within=15.0)
            print(f"west healthy again {time.monotonic() - back:.2f} s after it returned")
            assert p.east.egress.counters["calls"] == calls  # no call decided anything
            status, _, _, writer = await connect_via(p.east)
            assert status == 200
            await close_writer(writer)
    finally:
        await p.east.aclose()
        if west is not None:
            await west.aclose()


async def test_a_subscriber_gets_the_state_at_once_and_a_heartbeat(
    logs: LogCapture, east_ca: CertificateAuthority, west_ca: CertificateAuthority, echo_port: int
) -> None:
    p = await start_pair(east_ca, west_ca, echo_port, "tls")
    try:
        reader, writer = await asyncio.open_connection(*p.east.egress_address)
        writer.write(REQUEST)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert decode_report(await asyncio.wait_for(reader.readline(), 5)) == frozenset()
        assert p.east.egress.peer_health.subscribers == 1
        await close_writer(writer)
        await until(lambda: p.east.egress.peer_health.subscribers == 0)
        assert p.east.egress.counters["calls"] == 0  # a subscriber is not a call
    finally:
        await p.east.aclose()
        await p.west.aclose()


def test_the_report_codec() -> None:
    assert is_request(REQUEST.split(b"\r\n\r\n")[0])
    assert not is_request(b"GET /other HTTP/1.1\r\nHost: x")
    line = encode_report(frozenset({"west", "north"}), 3)
    assert line == b'{"unreachable": ["north", "west"], "seq": 3}\n'
    assert decode_report(line) == {"north", "west"}
    for bad in (b"{", b"[]", b'{"unreachable": "west"}', b'{"unreachable": [1]}',
                b'{"unreachable": ["West!"]}', b" " * 70_000):  # fmt: skip
        with pytest.raises(Exception, match="peer-health report"):
            decode_report(bad)
