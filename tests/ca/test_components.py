"""Identity in the components, on loopback: hot reload keeps established connections, and the
deny list (one snapshot) refuses new handshakes and closes live connections, in the sidecar
(both directions) and both tunnel transports of the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from structlog.testing import LogCapture

from ca.authority import CertificateAuthority, Svid
from mesh.model import Snapshot
from mesh.naming import gateway_identity
from tests.gateway.conftest import (
    EchoServer,
    close_writer,
    connect_via,
    gateway_svid,
    start_pair,
    stop_pair,
)
from tests.helpers import until
from tests.sidecar.conftest import EAST, Pki, spiffe
from tests.sidecar.loopback import VIP, Rig, start_rig, stop_rig

CLIENT = spiffe(EAST, "client")


def events(logs: LogCapture, name: str) -> list[dict[str, Any]]:
    return [dict(e) for e in logs.entries if e["event"] == name]


# --- sidecar -----------------------------------------------------------------------------------


@pytest.fixture
def pki() -> Pki:
    now = dt.datetime.now(dt.UTC)
    west = "west.fedgate.local"
    return Pki(
        CertificateAuthority.create(EAST, now),
        CertificateAuthority.create(west, now),
        CertificateAuthority.create(EAST, now),
        now,
    )


@pytest.fixture
async def rig(pki: Pki, logs: LogCapture) -> AsyncIterator[Rig]:
    r = await start_rig(pki)
    try:
        yield r
    finally:
        await stop_rig(r)


def deny(rig: Rig, *entries: str, version: str = "v-deny") -> Snapshot:
    snap = replace(rig.snapshot(weights=(("local", 100),), version=version), denied=entries)
    for sc in (rig.source, rig.east, rig.west):
        sc.apply(snap)
    return snap


async def shut(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def echo(rig: Rig, payload: bytes = b"ping") -> bytes:
    """One call through the mesh: the app echoes, then says `<pod>:bye` after our EOF."""
    reader, writer = await rig.dial((VIP, rig.app_port))
    try:
        writer.write(payload)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 5)
        if not got.endswith(b":bye"):
            raise ConnectionError(f"call ended early: {got!r}")
        return got[: len(payload)]
    finally:
        await shut(writer)


async def test_sidecar_renewal_keeps_established_connections(rig: Rig) -> None:
    reader, writer = await rig.dial((VIP, rig.app_port))
    writer.write(b"before")
    assert await asyncio.wait_for(reader.readexactly(6), 5) == b"before"
    # Both ends renew (what keep_identity does at half life).
    renewed_client = rig.pki.svid(rig.pki.east, CLIENT)
    renewed_server = rig.pki.svid(rig.pki.east, spiffe(EAST, "payments"))
    rig.source.set_identity(renewed_client)
    rig.east.set_identity(renewed_server)
    writer.write(b"after")  # the established connection keeps its TLS session
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"after"
    assert await echo(rig) == b"ping"  # a new handshake, with the renewed SVIDs
    assert rig.source.state().svid is renewed_client
    assert rig.east.state().svid is renewed_server
    writer.write_eof()
    assert (await asyncio.wait_for(reader.read(), 5)).endswith(b":bye")
    await shut(writer)


async def test_denying_the_caller_closes_its_connection_and_refuses_new_ones(
    rig: Rig, logs: LogCapture
) -> None:
    reader, writer = await rig.dial((VIP, rig.app_port))
    writer.write(b"x")
    assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
    deny(rig, CLIENT.uri)
    # The established connection is reset by the destination sidecar ...
    writer.write(b"more")
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(4), 5)
    (closed,) = events(logs, "inbound connection closed")
    assert closed["reason"] == "denied"
    assert closed["peer"] == CLIENT.uri
    # ... and a new call is refused with the reason logged.
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await echo(rig)
    await until(lambda: events(logs, "inbound refused"))
    refused = events(logs, "inbound refused")[-1]
    assert refused["reason"] == "denied", refused
    assert "deny list" in refused["detail"]
    await shut(writer)
    # Allowing it again (a snapshot without the entry) restores service.
    deny(rig, version="v-allow")
    assert await echo(rig) == b"ping"


async def test_denying_the_server_identity_is_enforced_by_the_caller(
    rig: Rig, logs: LogCapture
) -> None:
    server = spiffe(EAST, "payments")
    reader, writer = await rig.dial((VIP, rig.app_port))
    writer.write(b"x")
    assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
    deny(rig, server.uri)
    (closed,) = events(logs, "outbound connection closed")
    assert closed["peer"] == server.uri
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await echo(rig)
    await until(lambda: events(logs, "outbound failed"))
    failed = events(logs, "outbound failed")[-1]
    assert failed["reason"] == "server identity rejected"
    assert "deny list" in failed["detail"]
    await shut(writer)


async def test_denying_a_whole_trust_domain(rig: Rig, logs: LogCapture) -> None:
    deny(rig, f"spiffe://{EAST}")
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await echo(rig)


async def test_a_malformed_deny_list_is_nacked_whole(rig: Rig) -> None:
    from sidecar.errors import ConfigRejectedError

    bad = replace(rig.snapshot(version="v-bad"), denied=("not-a-uri",))
    with pytest.raises(ConfigRejectedError, match="deny entry"):
        rig.source.apply(bad)
    assert await echo(rig) == b"ping"  # the last good config stays


# --- gateway -----------------------------------------------------------------------------------


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.get_running_loop().create_server(EchoServer, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


@pytest.fixture(params=["quic", "tls"])
async def gpair(
    request: pytest.FixtureRequest, logs: LogCapture, echo_port: int
) -> AsyncIterator[Any]:
    now = dt.datetime.now(dt.UTC)
    east_ca = CertificateAuthority.create("east.fedgate.local", now)
    west_ca = CertificateAuthority.create("west.fedgate.local", now)
    pair = await start_pair(east_ca, west_ca, echo_port, request.param)
    pair.cas = (east_ca, west_ca)  # type: ignore[attr-defined]
    try:
        yield pair
    finally:
        await stop_pair(pair)


async def stream_ok(gw: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    status, reason, reader, writer = await connect_via(gw)
    assert status == 200, reason
    writer.write(b"hi")
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
    return reader, writer


async def test_gateway_renewal_keeps_open_streams_and_new_streams_work(gpair: Any) -> None:
    east_ca, west_ca = gpair.cas
    reader, writer = await stream_ok(gpair.east)
    for _ in range(3):  # several renewals on both sides while the stream stays open
        gpair.east.set_identity(gateway_svid(east_ca))
        gpair.west.set_identity(gateway_svid(west_ca))
        writer.write(b"still")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"still"
        _, w2 = await stream_ok(gpair.east)
        await close_writer(w2)
    await close_writer(writer)


@pytest.mark.parametrize("scope", ["identity", "trust-domain"])
async def test_gateway_deny_closes_the_tunnel_and_refuses_handshakes(
    gpair: Any, logs: LogCapture, scope: str
) -> None:
    east_ca, _ = gpair.cas
    reader, writer = await stream_ok(gpair.east)
    entry = (
        gateway_identity(east_ca.trust_domain).uri
        if scope == "identity"
        else f"spiffe://{east_ca.trust_domain}"
    )
    snap = replace(gpair.snapshot, version="v-deny", denied=(entry,))
    gpair.west.apply(snap)
    # West closed the live tunnel connection of the denied peer ...
    await until(lambda: events(logs, "tunnel peer no longer trusted"))
    assert "denied" in events(logs, "tunnel peer no longer trusted")[0]["reason"]
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, TimeoutError):
        writer.write(b"x")
        assert await asyncio.wait_for(reader.read(), 5) != b"x"
    # ... and refuses its new handshakes, saying why.
    status, _, _, w2 = await connect_via(gpair.east)
    await close_writer(w2)
    assert status != 200
    refused = events(logs, "tunnel handshake refused") + events(
        logs, "tunnel peer no longer trusted"
    )
    assert any("deny list" in str(e.get("reason", "")) for e in refused), refused
    # Allowing it again restores the tunnel.
    gpair.west.apply(replace(snap, version="v-allow", denied=()))
    for _ in range(20):
        status, _, _, w3 = await connect_via(gpair.east)
        await close_writer(w3)
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert status == 200
    await close_writer(writer)


async def test_a_config_push_after_renewal_does_not_cut_open_streams(gpair: Any) -> None:
    east_ca, west_ca = gpair.cas
    now = dt.datetime.now(dt.UTC)
    short = dt.timedelta(seconds=2)
    for gw, ca in ((gpair.east, east_ca), (gpair.west, west_ca)):
        ident = gateway_identity(ca.trust_domain)
        gw.set_identity(ca.issue(ident, now, ttl=short, dns_names=(f"gateway.{ca.trust_domain}",)))
    for pool in gpair.east.pools.values():  # connect anew with the short-lived certificates
        for conn in pool.connections():
            conn.close("test: new handshake")
    await asyncio.sleep(0.2)
    reader, writer = await stream_ok(gpair.east)
    gpair.east.set_identity(gateway_svid(east_ca))  # both renew (as at half life) ...
    gpair.west.set_identity(gateway_svid(west_ca))
    await asyncio.sleep(2.5)  # ... and the handshake-time certificates expire
    for gw in (gpair.east, gpair.west):
        gw.apply(replace(gpair.snapshot, version="v-next"))  # any config push
    writer.write(b"still")
    try:
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"still"
    finally:
        await close_writer(writer)


# --- every bad certificate, at each tunnel transport and the sidecar ------------------------


def _tampered(svid: Svid) -> Svid:
    """The same certificate with one signature bit flipped (key and SANs unchanged)."""
    der = bytearray(x509.load_pem_x509_certificate(svid.cert_pem).public_bytes(Encoding.DER))
    der[-12] ^= 0x01
    pem = x509.load_der_x509_certificate(bytes(der)).public_bytes(Encoding.PEM)
    return replace(svid, cert_pem=pem)


def bad_gateway_svid(
    kind: str, east_ca: CertificateAuthority, west_ca: CertificateAuthority
) -> Svid:
    now = dt.datetime.now(dt.UTC)
    ident = gateway_identity(east_ca.trust_domain)
    dns = (f"gateway.{east_ca.trust_domain}",)
    if kind == "expired":
        return east_ca.issue(ident, now - dt.timedelta(hours=2), dt.timedelta(minutes=1), dns)
    if kind == "foreign root":
        return CertificateAuthority.create(east_ca.trust_domain, now).issue(
            ident, now, dns_names=dns
        )
    if kind == "trust-domain mismatch":  # the west root minting an east identity
        forger = CertificateAuthority(east_ca.trust_domain, west_ca._key, west_ca.root)
        return forger.issue(ident, now, dns_names=dns)
    if kind == "tampered":
        return _tampered(gateway_svid(east_ca))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["expired", "foreign root", "trust-domain mismatch", "tampered"])
async def test_gateway_refuses_each_bad_peer_certificate_with_a_reason(
    gpair: Any, logs: LogCapture, kind: str
) -> None:
    east_ca, west_ca = gpair.cas
    for pool in gpair.east.pools.values():
        for conn in pool.connections():
            conn.close("test: new handshake")
    gpair.east.set_identity(bad_gateway_svid(kind, east_ca, west_ca))
    status, _, _, writer = await connect_via(gpair.east)
    await close_writer(writer)
    assert status != 200
    await until(lambda: events(logs, "tunnel handshake refused"))
    reasons = " | ".join(str(e["reason"]) for e in events(logs, "tunnel handshake refused"))
    # ca.verify's reason (QUIC), or OpenSSL's when it refuses first (TLS transport).
    expected = {
        "expired": ("expired",),
        "foreign root": ("not signed by any root", "unable to get local issuer"),
        "trust-domain mismatch": ("not signed by any root",),
        "tampered": ("not signed by any root", "signature failure"),
    }[kind]
    assert any(x in reasons for x in expected), reasons
    assert gpair.west.status()["counters"]["ingress"].get("calls", 0) == 0


async def test_sidecar_refuses_a_tampered_client_certificate(rig: Rig, logs: LogCapture) -> None:
    rig.source.set_identity(_tampered(rig.pki.svid(rig.pki.east, CLIENT)))
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await echo(rig)
    await until(lambda: events(logs, "inbound refused"))
    refused = events(logs, "inbound refused")[-1]
    assert refused["reason"] in ("certificate rejected", "tls alert from peer"), refused
    assert "signature" in str(refused["detail"]).lower(), refused
