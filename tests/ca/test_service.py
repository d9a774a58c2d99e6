"""The Sign service over real gRPC with TLS: token decides the identity, key stays home."""

from __future__ import annotations

import socket

import pytest
from cryptography import x509

from ca.authority import CertificateAuthority
from ca.client import obtain_svid
from ca.errors import IssuanceError
from ca.service import serve
from ca.verify import utcnow
from mesh.naming import SpiffeId

TD = "east.fedgate.local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_sign_with_token_and_refuse_unknown_token() -> None:
    ca = CertificateAuthority.create(TD, utcnow())
    ident = SpiffeId(TD, "demo", "echo")
    gateway = SpiffeId(TD, "fedgate-system", "gateway")
    tokens = {"good-token": ident, "gw-token": gateway}
    addr = f"127.0.0.1:{free_port()}"
    server = await serve(ca, tokens.get, addr)
    try:
        svid = await obtain_svid(addr, "good-token", ca.root_pem, TD)
        assert svid.spiffe_id == ident
        assert b"PRIVATE" not in svid.cert_pem
        gw = await obtain_svid(addr, "gw-token", ca.root_pem, TD)
        cert = x509.load_pem_x509_certificate(gw.cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [f"gateway.{TD}"]
        with pytest.raises(IssuanceError, match="UNAUTHENTICATED"):
            await obtain_svid(addr, "wrong-token", ca.root_pem, TD, attempts=1)
    finally:
        await server.stop(None)
