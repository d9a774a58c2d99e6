"""A cluster's certificate authority: its root, and SVIDs signed from CSRs.

Every identity is ECDSA P-256 (gRPC and `cryptography` reject Ed25519 signatures) and carries
exactly one SPIFFE URI SAN. The CA's private key stays in the process that loaded it; workloads
send CSRs and never share their keys (`ca.keys`). What this module does not do: decide *who* may
have an identity (the Sign service checks the bootstrap credential) or verify peers (`ca.verify`).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.errors import IssuanceError
from mesh.naming import SpiffeId

DEFAULT_SVID_TTL = dt.timedelta(hours=1)
DEFAULT_ROOT_TTL = dt.timedelta(days=365)
# Certificates are back-dated a little so a peer whose clock lags still accepts them.
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Svid:
    """An X.509 SVID with its private key; `cert_pem` holds the leaf first, then any chain."""

    spiffe_id: SpiffeId
    cert_pem: bytes
    key_pem: bytes
    not_after: dt.datetime

    def __repr__(self) -> str:  # never let the key reach a log line
        return f"Svid({self.spiffe_id.uri}, not_after={self.not_after.isoformat()})"


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def root_id(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()[:16]


def _san(spiffe_id: SpiffeId, dns_names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id.uri)]
    names += [x509.DNSName(d) for d in dns_names]
    return x509.SubjectAlternativeName(names)


class CertificateAuthority:
    """The issuing CA of one trust domain (a self-signed root in this version)."""

    def __init__(self, trust_domain: str, key: ec.EllipticCurvePrivateKey, root: x509.Certificate):
        self.trust_domain = trust_domain
        self._key = key
        self.root = root
        self.root_pem = cert_to_pem(root)

    @property
    def root_id(self) -> str:
        """A short stable name of this CA's root (its SHA-256 fingerprint, 16 hex digits)."""
        return root_id(self.root)

    def __repr__(self) -> str:
        return f"CertificateAuthority({self.trust_domain})"

    @classmethod
    def create(
        cls, trust_domain: str, now: dt.datetime, ttl: dt.timedelta = DEFAULT_ROOT_TTL
    ) -> CertificateAuthority:
        key = new_private_key()
        # Each root gets its own subject (the key id): during a rotation two roots of one
        # domain are trusted side by side, and TLS stacks look issuers up by subject name.
        skid = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest.hex()[:8]
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedgate"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"fedgate root {trust_domain} {skid}"),
            ]
        )
        spiffe_td = x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")
        root = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectAlternativeName([spiffe_td]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(trust_domain, key, root)

    def save(self, directory: Path) -> None:
        """Write `root.pem` and `root.key` (mode 0600) for this CA's own process to load."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "root.pem").write_bytes(self.root_pem)
        fd = os.open(directory / "root.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_to_pem(self._key))
        (directory / "trust-domain").write_text(self.trust_domain + "\n")

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        try:
            root = x509.load_pem_x509_certificate((directory / "root.pem").read_bytes())
            key = serialization.load_pem_private_key(
                (directory / "root.key").read_bytes(), password=None
            )
            trust_domain = (directory / "trust-domain").read_text().strip()
        except (OSError, ValueError) as e:
            raise IssuanceError(f"cannot load CA from {directory}: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise IssuanceError(f"CA key in {directory} is not an EC key")
        return cls(trust_domain, key, root)

    def sign_csr(
        self,
        csr_pem: bytes,
        spiffe_id: SpiffeId,
        now: dt.datetime,
        ttl: dt.timedelta = DEFAULT_SVID_TTL,
        dns_names: tuple[str, ...] = (),
    ) -> bytes:
        """Sign a CSR for `spiffe_id`; the identity comes from the caller's authentication,
        never from the CSR's own subject or SANs, which are ignored."""
        if spiffe_id.trust_domain != self.trust_domain:
            raise IssuanceError(
                f"CA of {self.trust_domain} cannot issue {spiffe_id.uri} (foreign trust domain)"
            )
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise IssuanceError(f"CSR is not valid PEM: {e}") from e
        if not csr.is_signature_valid:
            raise IssuanceError("CSR signature does not verify (proof of key possession failed)")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise IssuanceError("CSR key must be ECDSA P-256")
        return cert_to_pem(self._build_leaf(public_key, spiffe_id, now, ttl, dns_names))

    def issue(
        self,
        spiffe_id: SpiffeId,
        now: dt.datetime,
        ttl: dt.timedelta = DEFAULT_SVID_TTL,
        dns_names: tuple[str, ...] = (),
    ) -> Svid:
        """Issue an SVID with a key generated here, for the CA's own process (its servers)."""
        key = new_private_key()
        cert = self._build_leaf(key.public_key(), spiffe_id, now, ttl, dns_names)
        return Svid(spiffe_id, cert_to_pem(cert), key_to_pem(key), cert.not_valid_after_utc)

    def _build_leaf(
        self,
        public_key: ec.EllipticCurvePublicKey,
        spiffe_id: SpiffeId,
        now: dt.datetime,
        ttl: dt.timedelta,
        dns_names: tuple[str, ...],
    ) -> x509.Certificate:
        not_after = min(now + ttl, self.root.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain)])
            )
            .issuer_name(self.root.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(_san(spiffe_id, dns_names), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
            .sign(self._key, hashes.SHA256())
        )
