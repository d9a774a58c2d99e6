"""The SPIFFE verifier: every refusal names its reason, and trust domains are scoped."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.authority import CertificateAuthority
from ca.bundle import TrustBundle
from ca.errors import IssuanceError, VerificationError
from ca.keys import new_key_and_csr
from ca.verify import verify_chain
from mesh.naming import SpiffeId

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
EAST = "east.fedgate.local"
WEST = "west.fedgate.local"


def der(pem: bytes) -> list[bytes]:
    return [
        c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(pem)
    ]


@pytest.fixture(scope="module")
def east() -> CertificateAuthority:
    return CertificateAuthority.create(EAST, NOW)


@pytest.fixture(scope="module")
def west() -> CertificateAuthority:
    return CertificateAuthority.create(WEST, NOW)


@pytest.fixture(scope="module")
def bundle(east: CertificateAuthority, west: CertificateAuthority) -> TrustBundle:
    return TrustBundle.from_pem({EAST: [east.root_pem], WEST: [west.root_pem]})


def test_valid_svid_from_csr_verifies(east: CertificateAuthority, bundle: TrustBundle) -> None:
    ident = SpiffeId(EAST, "demo", "echo")
    _, csr = new_key_and_csr()
    cert = east.sign_csr(csr, ident, NOW)
    assert verify_chain(der(cert), bundle, NOW) == ident


def test_expired_certificate_is_refused(east: CertificateAuthority, bundle: TrustBundle) -> None:
    svid = east.issue(SpiffeId(EAST, "demo", "echo"), NOW, ttl=dt.timedelta(minutes=10))
    with pytest.raises(VerificationError, match="expired"):
        verify_chain(der(svid.cert_pem), bundle, NOW + dt.timedelta(minutes=11))


def test_foreign_root_is_refused(bundle: TrustBundle) -> None:
    rogue = CertificateAuthority.create(EAST, NOW)  # same domain name, root not in the bundle
    svid = rogue.issue(SpiffeId(EAST, "demo", "echo"), NOW)
    with pytest.raises(VerificationError, match="not signed by any root of its trust domain"):
        verify_chain(der(svid.cert_pem), bundle, NOW)


def test_root_vouches_only_for_its_own_trust_domain(
    west: CertificateAuthority, bundle: TrustBundle
) -> None:
    # The west CA object refuses to do it, so forge the leaf by relabelling the CA's domain:
    # this is what a compromised west CA could do.
    forged_ca = CertificateAuthority(EAST, west._key, west.root)
    svid = forged_ca.issue(SpiffeId(EAST, "demo", "echo"), NOW)
    with pytest.raises(VerificationError, match="trust-domain mismatch"):
        verify_chain(der(svid.cert_pem), bundle, NOW)


def test_unknown_trust_domain_is_refused(bundle: TrustBundle) -> None:
    north = CertificateAuthority.create("north.fedgate.local", NOW)
    svid = north.issue(SpiffeId("north.fedgate.local", "demo", "echo"), NOW)
    with pytest.raises(VerificationError, match="no root in the trust bundle"):
        verify_chain(der(svid.cert_pem), bundle, NOW)


def test_tampered_certificate_is_refused(east: CertificateAuthority, bundle: TrustBundle) -> None:
    svid = east.issue(SpiffeId(EAST, "demo", "echo"), NOW)
    raw = bytearray(der(svid.cert_pem)[0])
    raw[-10] ^= 0xFF  # flip a signature byte
    with pytest.raises(VerificationError):
        verify_chain([bytes(raw)], bundle, NOW)


def test_no_certificate_is_refused(bundle: TrustBundle) -> None:
    with pytest.raises(VerificationError, match="no certificate"):
        verify_chain([], bundle, NOW)


def test_ca_refuses_to_issue_outside_its_domain(east: CertificateAuthority) -> None:
    _, csr = new_key_and_csr()
    with pytest.raises(IssuanceError, match="foreign trust domain"):
        east.sign_csr(csr, SpiffeId(WEST, "demo", "echo"), NOW)


def test_bad_csr_is_refused(east: CertificateAuthority) -> None:
    with pytest.raises(IssuanceError, match="CSR"):
        east.sign_csr(b"not a csr", SpiffeId(EAST, "demo", "echo"), NOW)


def test_svid_repr_hides_the_key(east: CertificateAuthority) -> None:
    svid = east.issue(SpiffeId(EAST, "demo", "echo"), NOW)
    assert b"PRIVATE" in svid.key_pem
    assert "PRIVATE" not in repr(svid)
