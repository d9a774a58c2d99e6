"""The mTLS completion: raw aioquic clients that must not get a stream from the west tunnel.

Each refusal test also runs its client against a positive control shape: a client with a valid
east gateway SVID *is* served, so a refusal here is the server's doing, not a broken harness.
Without `gateway.quic_mtls` the server would never ask for, let alone check, a certificate, and
every one of these clients would read a StreamReply.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import MutableMapping
from dataclasses import replace
from typing import Any

import aioquic
import pytest
from aioquic import tls
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.tls import AlertDescription
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from structlog.testing import LogCapture

from ca.authority import CertificateAuthority, Svid
from gateway import quic_mtls
from gateway.gateway import _Identity
from gateway.tunnel import ALPN
from mesh.codec import StreamHeader, encode_header, split_frame
from mesh.naming import SpiffeId, gateway_identity
from tests.gateway.conftest import (
    EAST_TD,
    ECHO,
    ECHO_PORT,
    LOOPBACK,
    WEST_TD,
    Pair,
    close_writer,
    connect_via,
    gateway_svid,
    issue,
)

CRYPTO_ERROR = 0x100


class RawClient(QuicConnectionProtocol):
    def __init__(self, quic: QuicConnection, **kwargs: Any) -> None:
        super().__init__(quic, **kwargs)
        self.terminated: events.ConnectionTerminated | None = None

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            self.terminated = event
        super().quic_event_received(event)


def client_config(svid: Svid | None, west_ca: CertificateAuthority) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        server_name=f"gateway.{WEST_TD}",
        cadata=west_ca.root_pem,
    )
    if svid is not None:
        certs = x509.load_pem_x509_certificates(svid.cert_pem)
        config.certificate = certs[0]
        config.certificate_chain = certs[1:]
        config.private_key = serialization.load_pem_private_key(svid.key_pem, None)
    return config


async def try_stream(port: int, config: QuicConfiguration) -> tuple[bytes, RawClient]:
    """Handshake, open one stream naming echo.demo, return what came back (b"" if nothing)."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: RawClient(QuicConnection(configuration=config)), local_addr=(LOOPBACK, 0)
    )
    client: RawClient = proto
    try:
        client.connect((LOOPBACK, port))
        try:
            await asyncio.wait_for(client.wait_connected(), 5)
        except ConnectionError:
            return b"", client
        reader, writer = await client.create_stream()
        writer.write(encode_header(StreamHeader(ECHO, ECHO_PORT, "west")))
        try:
            data = await asyncio.wait_for(reader.read(4096), 5)
        except TimeoutError:
            data = b""
        finally:
            writer.close()
        if not data:
            await asyncio.wait_for(client.wait_closed(), 5)
        return data, client
    finally:
        client.close()
        transport.close()


def refusals(logs: LogCapture) -> list[MutableMapping[str, Any]]:
    return [e for e in logs.entries if e["event"] == "tunnel handshake refused"]


async def assert_refused(
    pair: Pair,
    config: QuicConfiguration,
    logs: LogCapture,
    alert: AlertDescription,
    reason_part: str,
) -> None:
    port = pair.west.tunnel_address[1]
    data, client = await try_stream(port, config)
    assert data == b"", f"the west tunnel served a stream: {data!r}"
    assert client.terminated is not None
    assert client.terminated.error_code == CRYPTO_ERROR + alert, client.terminated
    assert any(reason_part in e["reason"] for e in refusals(logs)), refusals(logs)
    # Nothing reached the ingress, and the gateway still serves real peers.
    assert pair.west.status()["counters"]["ingress"]["calls"] == 0
    status, reason, _, writer = await connect_via(pair.east)
    await close_writer(writer)
    assert status == 200, reason


async def test_positive_control_valid_east_gateway_is_served(
    pair: Pair, east_ca: CertificateAuthority, west_ca: CertificateAuthority
) -> None:
    data, _ = await try_stream(
        pair.west.tunnel_address[1], client_config(gateway_svid(east_ca), west_ca)
    )
    got = split_frame(data)
    assert got is not None
    assert got[0]["status"] == 200


async def test_client_without_certificate_is_refused(
    pair: Pair, west_ca: CertificateAuthority, logs: LogCapture
) -> None:
    await assert_refused(
        pair,
        client_config(None, west_ca),
        logs,
        AlertDescription.certificate_required,
        "presented no certificate",
    )


async def test_certificate_from_foreign_root_is_refused(
    pair: Pair, west_ca: CertificateAuthority, logs: LogCapture
) -> None:
    foreign = CertificateAuthority.create(EAST_TD, dt.datetime.now(dt.UTC))  # not in the bundle
    await assert_refused(
        pair,
        client_config(gateway_svid(foreign), west_ca),
        logs,
        AlertDescription.bad_certificate,
        "not signed by any root of its trust domain",
    )


async def test_identity_outside_its_roots_trust_domain_is_refused(
    pair: Pair, west_ca: CertificateAuthority, logs: LogCapture
) -> None:
    # West's (trusted) root mints the *east* gateway identity: SPIFFE federation forbids it.
    forged = issue(west_ca, gateway_identity(EAST_TD))
    await assert_refused(
        pair,
        client_config(forged, west_ca),
        logs,
        AlertDescription.bad_certificate,
        "not signed by any root of its trust domain east.fedgate.local",
    )


async def test_non_gateway_identity_is_refused(
    pair: Pair, east_ca: CertificateAuthority, west_ca: CertificateAuthority, logs: LogCapture
) -> None:
    workload = issue(east_ca, SpiffeId(EAST_TD, "demo", "client"))
    await assert_refused(
        pair,
        client_config(workload, west_ca),
        logs,
        AlertDescription.access_denied,
        "spiffe://east.fedgate.local/ns/demo/sa/client not authorized",
    )


async def test_gateway_of_unknown_cluster_is_refused(
    pair: Pair, west_ca: CertificateAuthority, logs: LogCapture
) -> None:
    # A valid chain, from a root the bundle trusts, for a cluster not in the snapshot.
    north_ca = CertificateAuthority.create("north.fedgate.local", dt.datetime.now(dt.UTC))
    bundle = dict(pair.snapshot.trust_bundle)
    bundle["north.fedgate.local"] = (north_ca.root_pem.decode(),)
    pair.west.apply(replace(pair.snapshot, trust_bundle=bundle))
    await assert_refused(
        pair,
        client_config(gateway_svid(north_ca), west_ca),
        logs,
        AlertDescription.access_denied,
        "not the gateway identity of a known peer cluster",
    )


async def test_egress_refuses_a_peer_that_is_not_the_expected_gateway(
    pair: Pair, west_ca: CertificateAuthority, logs: LogCapture
) -> None:
    """Client side: west's tunnel presents a west-rooted certificate with the right DNS SAN
    (aioquic's own check passes) but a workload identity: east's egress must refuse it."""
    impostor_id = SpiffeId(WEST_TD, "demo", "echo")
    impostor = west_ca.issue(
        impostor_id, dt.datetime.now(dt.UTC), dns_names=(f"gateway.{WEST_TD}",)
    )
    # Swap west's server identity for the impostor's, bypassing set_identity's own check.
    certs = x509.load_pem_x509_certificates(impostor.cert_pem)
    key = serialization.load_pem_private_key(impostor.key_pem, None)
    pair.west._identity = _Identity(impostor, certs[0], (), key)  # type: ignore[arg-type]
    status, reason, _, writer = await connect_via(pair.east)
    await close_writer(writer)
    assert status == 502
    assert "tunnel to west" in reason
    assert any(
        "spiffe://west.fedgate.local/ns/demo/sa/echo not authorized" in e["reason"]
        for e in refusals(logs)
    )


async def test_new_bundle_applies_to_new_handshakes(
    pair: Pair, east_ca: CertificateAuthority, west_ca: CertificateAuthority, logs: LogCapture
) -> None:
    west_only = {WEST_TD: pair.snapshot.trust_bundle[WEST_TD]}
    pair.west.apply(replace(pair.snapshot, version="v2", trust_bundle=west_only))
    data, client = await try_stream(
        pair.west.tunnel_address[1], client_config(gateway_svid(east_ca), west_ca)
    )
    assert data == b""
    assert client.terminated is not None
    assert any("no root in the trust bundle" in e["reason"] for e in refusals(logs))


async def test_removing_a_root_closes_live_connections(pair: Pair, logs: LogCapture) -> None:
    status, reason, _, writer = await connect_via(pair.east)
    await close_writer(writer)
    assert status == 200, reason
    (inbound,) = pair.west._server.connections  # type: ignore[union-attr]
    west_only = {WEST_TD: pair.snapshot.trust_bundle[WEST_TD]}
    pair.west.apply(replace(pair.snapshot, version="v2", trust_bundle=west_only))
    await asyncio.wait_for(inbound.wait_closed(), 5)
    assert "peer no longer trusted" in inbound.close_reason
    assert any(e["event"] == "tunnel peer no longer trusted" for e in logs.entries)
    status, reason, _, writer = await connect_via(pair.east)
    await close_writer(writer)
    assert status == 502, reason


def test_import_check_refuses_an_unreviewed_aioquic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aioquic, "__version__", "1.8.0")
    with pytest.raises(ImportError, match=r"aioquic 1\.7\.x internals; found aioquic 1\.8\.0"):
        quic_mtls._check_aioquic()


def test_import_check_refuses_missing_internals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(tls.Context, "_server_handle_certificate")
    with pytest.raises(ImportError, match="_server_handle_certificate"):
        quic_mtls._check_aioquic()


async def test_rotated_identity_is_used_by_new_handshakes(
    pair: Pair, west_ca: CertificateAuthority
) -> None:
    status, _, _, writer = await connect_via(pair.east)
    await close_writer(writer)
    assert status == 200
    rotated = gateway_svid(west_ca)
    pair.west.set_identity(rotated)
    (old,) = pair.east.pools["quic"].connections_to("west")
    old.close("test: force a new handshake")
    await asyncio.wait_for(old.wait_closed(), 5)
    status, reason, _, writer = await connect_via(pair.east)
    await close_writer(writer)
    assert status == 200, reason
    (new,) = pair.east.pools["quic"].connections_to("west")
    presented = new.quic.tls._peer_certificate
    assert presented is not None
    assert presented == x509.load_pem_x509_certificate(rotated.cert_pem)
