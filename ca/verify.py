"""The one SPIFFE-aware certificate verifier every component uses.

`verify_chain` checks, with reasons a log reader can act on:
1. the leaf carries exactly one `spiffe://` URI SAN, well formed, and is not a CA;
2. every certificate is within its validity period at `now`;
3. the chain leads, by signature, to a root of the *leaf's own* trust domain in the bundle
   (SPIFFE federation: a root vouches only for its own domain);
4. intermediates are CAs;
5. the identity (or its trust domain) is not on the bundle's deny list (revocation on top of
   short lifetimes), checked last so a forged chain is reported as forged.

Expiry raises `CertificateExpiredError` and denial `DeniedError` (both `VerificationError`s), so
a caller re-checking a live connection can tell "drain it" from "cut it".

TLS stacks (OpenSSL via `ssl`, aioquic) also validate chains against all roots, but none of them
knows trust-domain scoping or the deny list: call this after every handshake. It does not check
who may call what (authz).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from ca.bundle import TrustBundle
from ca.errors import CertificateExpiredError, DeniedError, VerificationError
from mesh.errors import MeshError
from mesh.naming import SpiffeId

MAX_CHAIN = 4


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as e:
        raise VerificationError("certificate has no subjectAltName, so no SPIFFE ID") from e
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    if len(spiffe) != 1:
        raise VerificationError(f"certificate must carry exactly one SPIFFE ID, has {len(spiffe)}")
    try:
        return SpiffeId.parse(spiffe[0])
    except MeshError as e:
        raise VerificationError(f"malformed SPIFFE ID: {e}") from e


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _check_time(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise VerificationError(f"{what} is not valid before {cert.not_valid_before_utc}")
    if now > cert.not_valid_after_utc:
        raise CertificateExpiredError(f"{what} expired at {cert.not_valid_after_utc.isoformat()}")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def load_chain(chain_der: Sequence[bytes]) -> list[x509.Certificate]:
    if not chain_der:
        raise VerificationError("peer presented no certificate")
    if len(chain_der) > MAX_CHAIN:
        raise VerificationError(f"certificate chain longer than {MAX_CHAIN}")
    try:
        return [x509.load_der_x509_certificate(d) for d in chain_der]
    except ValueError as e:
        raise VerificationError(f"certificate does not parse: {e}") from e


def verify_certs(
    chain: Sequence[x509.Certificate], bundle: TrustBundle, now: dt.datetime
) -> SpiffeId:
    leaf, intermediates = chain[0], list(chain[1:])
    spiffe_id = spiffe_id_of(leaf)
    if _is_ca(leaf):
        raise VerificationError(f"{spiffe_id} presents a CA certificate as its leaf")
    _check_time(leaf, now, f"certificate of {spiffe_id}")
    roots = bundle.for_domain(spiffe_id.trust_domain)
    if not roots:
        raise VerificationError(
            f"no root in the trust bundle for trust domain {spiffe_id.trust_domain} "
            f"(identity {spiffe_id})"
        )
    current = leaf
    for _ in range(MAX_CHAIN):
        for root in roots:
            if _issued_by(current, root):
                _check_time(root, now, f"root of {spiffe_id.trust_domain}")
                _check_denied(spiffe_id, bundle)
                return spiffe_id
        nxt = next((i for i in intermediates if _issued_by(current, i)), None)
        if nxt is None:
            break
        if not _is_ca(nxt):
            raise VerificationError(f"intermediate {nxt.subject.rfc4514_string()} is not a CA")
        _check_time(nxt, now, f"intermediate {nxt.subject.rfc4514_string()}")
        intermediates.remove(nxt)
        current = nxt
    raise VerificationError(
        f"certificate of {spiffe_id} is not signed by any root of its trust domain "
        f"{spiffe_id.trust_domain} (foreign root, trust-domain mismatch or tampered chain)"
    )


def _check_denied(spiffe_id: SpiffeId, bundle: TrustBundle) -> None:
    entry = bundle.denial(spiffe_id)
    if entry is None:
        return
    what = "identity" if entry == spiffe_id.uri else f"trust domain of {spiffe_id}"
    raise DeniedError(f"{what} is denied by the federation's deny list ({entry})")


def verify_chain(chain_der: Sequence[bytes], bundle: TrustBundle, now: dt.datetime) -> SpiffeId:
    """Verify a peer's DER chain (leaf first) and return its SPIFFE ID, or raise."""
    return verify_certs(load_chain(chain_der), bundle, now)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
