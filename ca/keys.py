"""Workload side of issuance: a key generated where it is used, and a CSR to send.

The private key never leaves the process that called `new_key_and_csr`.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from ca.authority import key_to_pem, new_private_key
from mesh.naming import SpiffeId


def new_key_and_csr(requested: SpiffeId | None = None) -> tuple[bytes, bytes]:
    """Return (key_pem, csr_pem). `requested` is informational: the CA decides the identity."""
    key = new_private_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedgate workload")])
    )
    if requested is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(requested.uri)]), False
        )
    csr = builder.sign(key, hashes.SHA256())
    return key_to_pem(key), csr.public_bytes(serialization.Encoding.PEM)
