"""The tunnel's acknowledgement policy (`gateway.quic_ack`): two real tunnel QUIC connections
(mTLS with per-run gateway certificates) wired back to back in memory, on a fake clock.

The last test runs it through the real driver: two gateways on loopback, a CONNECT client and
an echo server, counting the listener's datagrams.

What must hold: a response carries the ACK of its request, so an exchange is two packets, not
four; a lone packet's ACK waits at most `lone_ack_delay`; a bulk transfer, a gap and a PING
are acknowledged on aioquic's 1 ms; ACK frames received are handled after the data that came
with them and before anything is sent. The control (`lone_ack_delay=None`) shows the aioquic
behaviour the policy replaces, so these tests fail if either side changes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from aioquic import tls
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.authority import CertificateAuthority, Svid
from ca.bundle import TrustBundle
from gateway.quic_ack import LONE_ACK_DELAY, AckingQuicConnection, new_connection
from gateway.quic_flow import TunnelQuicConnection
from gateway.quic_mtls import PeerPolicy
from gateway.tunnel import ALPN
from tests.gateway.conftest import (
    EAST_TD,
    WEST_TD,
    close_writer,
    connect_via,
    gateway_svid,
    start_pair,
    stop_pair,
)

EAST_ADDR = ("10.0.0.1", 40000)
WEST_ADDR = ("10.0.0.2", 15443)
ACK_DELAY = 0.001  # aioquic 1.7's
T0 = 1000.0


def _config(is_client: bool, svid: Svid, anchors: bytes) -> QuicConfiguration:
    config = QuicConfiguration(is_client=is_client, alpn_protocols=[ALPN])
    certs = x509.load_pem_x509_certificates(svid.cert_pem)
    config.certificate = certs[0]
    config.certificate_chain = certs[1:]
    config.private_key = serialization.load_pem_private_key(svid.key_pem, None)  # type: ignore[assignment]
    if is_client:
        config.server_name = f"gateway.{WEST_TD}"
        config.cadata = anchors
    return config


@dataclass
class Link:
    """east (client) and west (server) back to back; `now` is the fake clock."""

    east: TunnelQuicConnection
    west: TunnelQuicConnection
    now: float = T0

    def send(self, src: TunnelQuicConnection) -> list[bytes]:
        """As the driver's `transmit`: build, then the ACKs set aside, then what they freed."""
        out = src.datagrams_to_send(now=self.now)
        if isinstance(src, AckingQuicConnection) and src.handle_deferred_acks():
            out += src.datagrams_to_send(now=self.now)
        return [data for data, _ in out]

    def deliver(self, dst: TunnelQuicConnection, datagrams: list[bytes]) -> list[Any]:
        addr = WEST_ADDR if dst is self.east else EAST_ADDR
        for data in datagrams:
            dst.receive_datagram(data, addr, now=self.now)
        got = []
        while (event := dst.next_event()) is not None:
            got.append(event)
        return got

    def pump(self) -> None:
        """Until neither side has anything to send (the handshake)."""
        for _ in range(20):
            moved = False
            for src, dst in ((self.east, self.west), (self.west, self.east)):
                datagrams = self.send(src)
                moved = moved or bool(datagrams)
                self.deliver(dst, datagrams)
            if not moved:
                return
            self.now += 0.0001

    def ack_at(self, conn: TunnelQuicConnection) -> float | None:
        return conn._spaces[tls.Epoch.ONE_RTT].ack_at


def link(
    east_ca: CertificateAuthority,
    west_ca: CertificateAuthority,
    lone_ack_delay: float | None = LONE_ACK_DELAY,
) -> Link:
    bundle = TrustBundle.from_pem({EAST_TD: [east_ca.root_pem], WEST_TD: [west_ca.root_pem]})
    policy = PeerPolicy(bundle=lambda: bundle, authorize=lambda _: None)
    east = new_connection(
        configuration=_config(True, gateway_svid(east_ca), west_ca.root_pem),
        peer_policy=policy,
        lone_ack_delay=lone_ack_delay,
    )
    west = new_connection(
        configuration=_config(False, gateway_svid(west_ca), b""),
        original_destination_connection_id=east.original_destination_connection_id,
        peer_policy=policy,
        lone_ack_delay=lone_ack_delay,
    )
    pair = Link(east, west)
    east.connect(WEST_ADDR, now=pair.now)
    pair.pump()
    assert east._handshake_confirmed
    assert west._handshake_confirmed
    pair.now += 1.0  # well past every handshake timer
    pair.pump()
    return pair


def request(pair: Link, payload: bytes = b"q" * 1024) -> int:
    stream_id = pair.east.get_next_available_stream_id()
    pair.east.send_stream_data(stream_id, payload)
    return stream_id


def burst(pair: Link) -> list[bytes]:
    """A 4,000-byte write: several datagrams (the pacer may space them by microseconds)."""
    request(pair, b"b" * 4000)
    sent = pair.send(pair.east)
    while len(sent) < 3:
        pair.now += 0.00002
        more = pair.send(pair.east)
        assert more or pair.east.get_timer() is not None
        sent += more
    return sent


def acking(conn: TunnelQuicConnection) -> AckingQuicConnection:
    assert isinstance(conn, AckingQuicConnection)
    return conn


def in_flight(conn: TunnelQuicConnection) -> int:
    return conn._loss.bytes_in_flight


def test_an_exchange_is_two_packets(
    east_ca: CertificateAuthority, west_ca: CertificateAuthority
) -> None:
    pair = link(east_ca, west_ca)
    stream_id = request(pair)
    sent = pair.send(pair.east)
    assert len(sent) == 1
    got = pair.deliver(pair.west, sent)
    assert any(isinstance(e, events.StreamDataReceived) for e in got)
    # A lone request: its ACK may wait for the response, up to LONE_ACK_DELAY.
    assert pair.ack_at(pair.west) == pytest.approx(pair.now + LONE_ACK_DELAY)
    assert pair.send(pair.west) == []  # nothing to send on its own

    pair.now += 0.0002  # the destination answers
    pair.west.send_stream_data(stream_id, b"r" * 1024)
    response = pair.send(pair.west)
    assert len(response) == 1
    assert in_flight(pair.east) > 0
    pair.deliver(pair.east, response)
    # The response acknowledged the request: handled after the data, at the next send.
    assert acking(pair.east).deferred_acks
    assert not acking(pair.east).has_unsent_data()
    assert in_flight(pair.east) > 0
    assert pair.send(pair.east) == []  # and still nothing of its own to send
    assert in_flight(pair.east) == 0

    # The response's own ACK rides on the next request.
    pair.now += 0.005
    request(pair)
    pair.deliver(pair.west, pair.send(pair.east))
    pair.send(pair.west)
    assert in_flight(pair.west) == 0


def test_aioquic_alone_sends_an_ack_only_packet_each_way(
    east_ca: CertificateAuthority, west_ca: CertificateAuthority
) -> None:
    """The control: what the policy replaces (and a check that it is really off)."""
    pair = link(east_ca, west_ca, lone_ack_delay=None)
    assert not isinstance(pair.east, AckingQuicConnection)
    stream_id = request(pair)
    pair.deliver(pair.west, pair.send(pair.east))
    assert pair.ack_at(pair.west) == pytest.approx(pair.now + ACK_DELAY)
    pair.now += 0.0002
    pair.west.send_stream_data(stream_id, b"r" * 1024)
    pair.deliver(pair.east, pair.send(pair.west))
    pair.send(pair.east)
    assert in_flight(pair.east) > 0  # the response did not acknowledge the request
    pair.now += ACK_DELAY
    pair.west.handle_timer(now=pair.now)
    ack_only = pair.send(pair.west)
    assert len(ack_only) == 1
    pair.deliver(pair.east, ack_only)
    assert in_flight(pair.east) == 0


def test_a_lone_packet_is_acknowledged_by_its_deadline(
    east_ca: CertificateAuthority, west_ca: CertificateAuthority
) -> None:
    pair = link(east_ca, west_ca)
    request(pair)
    received_at = pair.now
    pair.deliver(pair.west, pair.send(pair.east))
    timer = pair.west.get_timer()
    assert timer is not None
    assert timer <= received_at + LONE_ACK_DELAY
    pair.now = received_at + LONE_ACK_DELAY
    pair.west.handle_timer(now=pair.now)
    ack_only = pair.send(pair.west)
    assert len(ack_only) == 1
    pair.deliver(pair.east, ack_only)
    pair.send(pair.east)
    assert in_flight(pair.east) == 0


def test_a_burst_is_acknowledged_after_1ms(
    east_ca: CertificateAuthority, west_ca: CertificateAuthority
) -> None:
    pair = link(east_ca, west_ca)
    sent = burst(pair)
    first_at = pair.now
    pair.deliver(pair.west, sent[:1])
    assert pair.ack_at(pair.west) == pytest.approx(first_at + LONE_ACK_DELAY)
    pair.now += 0.0003
    pair.deliver(pair.west, sent[1:])
    assert pair.ack_at(pair.west) == pytest.approx(first_at + ACK_DELAY)


def test_a_gap_is_acknowledged_after_1ms(
    east_ca: CertificateAuthority, west_ca: CertificateAuthority
) -> None:
    pair = link(east_ca, west_ca)
    sent = burst(pair)
    pair.deliver(pair.west, sent[1:2])  # the first one is lost
    assert pair.ack_at(pair.west) == pytest.approx(pair.now + ACK_DELAY)


def test_a_ping_is_acknowledged_after_1ms(
    east_ca: CertificateAuthority, west_ca: CertificateAuthority
) -> None:
    """Keepalive PINGs time the round trip (`/config` rtt_ms): no 20 ms in it."""
    pair = link(east_ca, west_ca)
    pair.east.send_ping(7)
    pair.deliver(pair.west, pair.send(pair.east))
    assert pair.ack_at(pair.west) == pytest.approx(pair.now + ACK_DELAY)
    pair.now += ACK_DELAY
    pair.west.handle_timer(now=pair.now)
    got = pair.deliver(pair.east, pair.send(pair.west))
    acking(pair.east).handle_deferred_acks()
    got += list(iter(pair.east.next_event, None))
    assert events.PingAcknowledged(uid=7) in got


def test_a_lone_ack_delay_beyond_the_advertised_maximum_is_refused(
    east_ca: CertificateAuthority, west_ca: CertificateAuthority
) -> None:
    with pytest.raises(ValueError, match="lone_ack_delay"):
        link(east_ca, west_ca, lone_ack_delay=0.025)


@pytest.mark.parametrize(
    ("lone_ack_delay", "per_exchange"), [(LONE_ACK_DELAY, (1.0, 1.2)), (None, (1.6, 2.2))]
)
async def test_ping_pong_through_two_gateways(
    east_ca: CertificateAuthority,
    west_ca: CertificateAuthority,
    echo_port: int,
    lone_ack_delay: float | None,
    per_exchange: tuple[float, float],
) -> None:
    """With the policy the west listener sends about one datagram per exchange (the answer,
    carrying the ACK); with aioquic's timing about two (the answer, then an ACK-only one)."""
    pair = await start_pair(east_ca, west_ca, echo_port, "quic", lone_ack_delay=lone_ack_delay)
    try:
        status, reason, reader, writer = await connect_via(pair.east)
        assert status == 200, reason
        exchanges = 40
        before = dict(pair.west.status()["counters"]["tunnel_server"])
        for i in range(exchanges):
            message = bytes([i]) * 1024
            writer.write(message)
            assert await asyncio.wait_for(reader.readexactly(1024), 5) == message
            # A call's pace, not a wait for anything: aioquic's 1 ms ACK timer fires between
            # the exchanges; the policy's 20 ms one does not.
            await asyncio.sleep(0.003)
        after = pair.west.status()["counters"]["tunnel_server"]
        sent = after["udp_datagrams_sent"] - before["udp_datagrams_sent"]
        low, high = per_exchange
        assert low * exchanges <= sent <= high * exchanges, (sent, exchanges)
        await close_writer(writer)
    finally:
        await stop_pair(pair)


def test_quiet_only_when_nothing_of_ours_waits(
    east_ca: CertificateAuthority, west_ca: CertificateAuthority
) -> None:
    """`quiet()` lets the driver skip the flush after a received packet (`gateway.tunnel`):
    never while data of ours is unsent or unacknowledged."""
    pair = link(east_ca, west_ca, lone_ack_delay=None)
    assert pair.east.quiet()
    assert pair.west.quiet()
    stream_id = request(pair)
    assert pair.east.has_unsent_data()
    assert not pair.east.quiet()  # written, not sent
    pair.deliver(pair.west, pair.send(pair.east))
    assert not pair.east.has_unsent_data()
    assert not pair.east.quiet()  # sent, not acknowledged
    assert pair.west.quiet()  # it only owes an ACK, due in 1 ms
    pair.now += ACK_DELAY
    pair.west.handle_timer(now=pair.now)
    pair.deliver(pair.east, pair.send(pair.west))
    assert pair.east.quiet()  # acknowledged
    pair.west.reset_stream(stream_id, 0)
    assert not pair.west.quiet()  # a reset to send
