"""The data plane's TLS contexts trust the mesh's roots and nothing else (issue 17).

`ssl.create_default_context` without `cadata` loads the system's public CAs into a client
context: ~140 certificates, ~0.95 MiB per context, held by every sidecar and gateway."""

from __future__ import annotations

import ssl

import pytest

from ca.authority import CertificateAuthority
from ca.bundle import TrustBundle
from ca.errors import VerificationError
from ca.tls import client_context, server_context
from ca.verify import utcnow
from mesh.naming import SpiffeId


def test_contexts_hold_only_the_bundles_roots() -> None:
    now = utcnow()
    east = CertificateAuthority.create("east.fedgate.local", now)
    west = CertificateAuthority.create("west.fedgate.local", now)
    bundle = TrustBundle.from_pem(
        {"east.fedgate.local": [east.root_pem], "west.fedgate.local": [west.root_pem]}
    )
    svid = east.issue(SpiffeId("east.fedgate.local", "demo", "echo"), now)
    system = ssl.create_default_context(ssl.Purpose.SERVER_AUTH).cert_store_stats()["x509_ca"]
    assert system > 0  # this machine has public CAs, so the check below can fail
    for ctx in (
        client_context(svid, bundle),
        client_context(svid, bundle, alpn=("h2",)),
        server_context(svid, bundle),
    ):
        assert ctx.cert_store_stats()["x509_ca"] == 2
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3


def test_an_empty_bundle_is_refused() -> None:
    now = utcnow()
    east = CertificateAuthority.create("east.fedgate.local", now)
    svid = east.issue(SpiffeId("east.fedgate.local", "demo", "echo"), now)
    with pytest.raises(VerificationError, match="trust bundle is empty"):
        client_context(svid, TrustBundle.from_pem({}))
