"""The Sign service over real gRPC: token for the first SVID, the current SVID for renewals."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from structlog.testing import LogCapture

from ca import cadir
from ca.authority import CertificateAuthority, root_id
from ca.client import CaRefusedError, obtain_svid
from ca.errors import IssuanceError
from ca.service import CaView, renew_address_for, serve
from ca.verify import utcnow
from mesh.naming import SpiffeId
from tests.ca.conftest import free_pair
from tests.wires import wire  # noqa: F401  (the fixture)

TD = "east.fedgate.local"
ECHO = SpiffeId(TD, "demo", "echo")
GATEWAY = SpiffeId(TD, "fedgate-system", "gateway")

pytestmark = pytest.mark.usefixtures("wire")


def issuer_id(pem: bytes) -> str:
    return x509.load_pem_x509_certificates(pem)[0].issuer.rfc4514_string()


def refusals(logs: LogCapture) -> list[str]:
    return [str(e["reason"]) for e in logs.entries if e["event"] == "sign refused"]


async def test_sign_with_token_and_refuse_unknown_token() -> None:
    ca = CertificateAuthority.create(TD, utcnow())
    tokens = {"good-token": ECHO, "gw-token": GATEWAY}
    addr = free_pair()
    server = await serve(ca, tokens.get, addr)
    try:
        svid = await obtain_svid(addr, "good-token", ca.root_pem, TD)
        assert svid.spiffe_id == ECHO
        assert b"PRIVATE" not in svid.cert_pem
        gw = await obtain_svid(addr, "gw-token", ca.root_pem, TD)
        cert = x509.load_pem_x509_certificate(gw.cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [f"gateway.{TD}"]
        with pytest.raises(IssuanceError, match="UNAUTHENTICATED"):
            await obtain_svid(addr, "wrong-token", ca.root_pem, TD, attempts=1)
    finally:
        await server.stop(None)


async def test_renewal_is_authenticated_by_the_current_svid(logs: LogCapture) -> None:
    ca = CertificateAuthority.create(TD, utcnow())
    addr = free_pair()
    server = await serve(ca, {"t": GATEWAY}.get, addr)
    try:
        first = await obtain_svid(addr, "t", ca.root_pem, TD, ttl_seconds=30)
        renewed = await obtain_svid(
            renew_address_for(addr), "", ca.root_pem, TD, ttl_seconds=30, current=first
        )
        assert renewed.spiffe_id == GATEWAY  # the same identity, DNS SAN included
        assert renewed.key_pem != first.key_pem  # a new key, generated here
        cert = x509.load_pem_x509_certificate(renewed.cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [f"gateway.{TD}"]
        # The renewal port requires a client certificate: a token alone does not get in.
        with pytest.raises(IssuanceError):
            await obtain_svid(renew_address_for(addr), "t", ca.root_pem, TD, attempts=1)
    finally:
        await server.stop(None)
    assert [e["event"] for e in logs.entries if "svid" in str(e["event"])] == [
        "svid issued",
        "svid renewed",
    ]


async def test_renewal_refusals_name_their_reason(logs: LogCapture) -> None:
    now = utcnow()
    ca = CertificateAuthority.create(TD, now)
    denied: set[str] = set()
    addr = free_pair()
    renew = renew_address_for(addr)
    server = await serve(ca, {"t": ECHO}.get, addr, denied=lambda: frozenset(denied))
    try:
        first = await obtain_svid(addr, "t", ca.root_pem, TD)

        # Denied identity: neither renewal nor a fresh token issuance.
        denied.add(ECHO.uri)
        with pytest.raises(CaRefusedError, match="PERMISSION_DENIED") as info:
            await obtain_svid(renew, "", ca.root_pem, TD, attempts=1, current=first)
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        with pytest.raises(CaRefusedError, match="denied"):
            await obtain_svid(addr, "t", ca.root_pem, TD, attempts=1)
        denied.clear()

        # Trust-domain mismatch: our own root minting a west identity (a compromised key).
        forger = CertificateAuthority("west.fedgate.local", ca._key, ca.root)
        west = forger.issue(SpiffeId("west.fedgate.local", "demo", "echo"), now)
        with pytest.raises(CaRefusedError, match="UNAUTHENTICATED"):
            await obtain_svid(renew, "", ca.root_pem, TD, attempts=1, current=west)

        # Expired and foreign-root SVIDs fail the TLS handshake (OpenSSL, before our code).
        expired = ca.issue(ECHO, now - dt.timedelta(hours=2), ttl=dt.timedelta(minutes=1))
        with pytest.raises(IssuanceError):
            await obtain_svid(renew, "", ca.root_pem, TD, attempts=1, current=expired)
        rogue = CertificateAuthority.create(TD, now).issue(ECHO, now)
        with pytest.raises(IssuanceError):
            await obtain_svid(renew, "", ca.root_pem, TD, attempts=1, current=rogue)
    finally:
        await server.stop(None)
    reasons = refusals(logs)
    assert any("denied by the federation's deny list" in r for r in reasons)
    assert any("no root in the trust bundle for trust domain west" in r for r in reasons)


async def test_rotation_switches_issuance_and_renews_svids_of_the_old_root(
    tmp_path: Path,
) -> None:
    now = utcnow()
    old = cadir.init_ca_dir(tmp_path, TD, now, max_svid_ttl=dt.timedelta(seconds=30))
    watcher = cadir.CaDirectory(tmp_path)

    def view() -> CaView:
        st = watcher.state
        return CaView(st.issuer, st.published(utcnow()), st.plan.max_svid_ttl)

    addr = free_pair()
    server = await serve(view, {"t": ECHO}.get, addr)
    try:
        first = await obtain_svid(addr, "t", old.root_pem, TD)
        new_id = cadir.prepare_rotation(tmp_path, utcnow())
        cadir.activate_rotation(tmp_path, new_id, utcnow())
        assert watcher.reload() is None
        both = cadir.anchors_pem(tmp_path, utcnow())  # what the snapshot gives the workload
        renewed = await obtain_svid(
            renew_address_for(addr), "", both, TD, attempts=1, current=first
        )
        leaf = x509.load_pem_x509_certificate(renewed.cert_pem)
        assert leaf.issuer == watcher.state.issuer.root.subject
        assert root_id(watcher.state.issuer.root) == new_id
        # The CA's serving certificate moved to the new root too: old anchors alone fail.
        with pytest.raises(IssuanceError):
            await obtain_svid(addr, "t", old.root_pem, TD, attempts=1)
    finally:
        await server.stop(None)
