"""Obtaining an SVID: generate a key here, send a CSR, get a certificate back.

First issuance goes to the CA's bootstrap port with a join token; renewal goes to its renewal
port over mutual TLS, authenticated by the current SVID (no token). Either way the private key
is generated in this process and never sent.
"""

from __future__ import annotations

import asyncio

import grpc
from cryptography import x509

from ca.api import ca_pb2, ca_pb2_grpc
from ca.authority import Svid
from ca.errors import IssuanceError
from ca.keys import new_key_and_csr
from ca.service import ca_server_name
from ca.verify import spiffe_id_of

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class CaUnavailableError(IssuanceError):
    """The CA could not be reached (after the attempts allowed); the caller may retry later."""


class CaRefusedError(IssuanceError):
    """The CA answered and refused (unknown token, expired or denied SVID, bad CSR)."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


async def obtain_svid(
    address: str,
    token: str,
    anchors_pem: bytes,
    trust_domain: str,
    ttl_seconds: int = 0,
    attempts: int = 30,
    *,
    current: Svid | None = None,
    rpc_timeout: float = 5.0,
) -> Svid:
    """Ask the CA at `address` for an SVID; retries while the CA is unreachable (start-up).

    With `current`, this is a renewal: `address` is the CA's renewal port, the channel
    presents `current` as client certificate and `token` is not sent. The new SVID has the
    same identity. `anchors_pem` must include the root that signed the CA's serving
    certificate (during a rotation: every root of the trust domain).
    """
    key_pem, csr_pem = new_key_and_csr()
    if current is None:
        creds = grpc.ssl_channel_credentials(root_certificates=anchors_pem)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=anchors_pem,
            private_key=current.key_pem,
            certificate_chain=current.cert_pem,
        )
        token = ""
    options = [("grpc.ssl_target_name_override", ca_server_name(trust_domain))]
    delay = 0.1
    for attempt in range(attempts):
        async with grpc.aio.secure_channel(address, creds, options=options) as channel:
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            try:
                resp = await stub.Sign(
                    ca_pb2.SignRequest(csr_pem=csr_pem, token=token, ttl_seconds=ttl_seconds),
                    timeout=rpc_timeout,
                )
                break
            except grpc.aio.AioRpcError as e:
                text = f"CA at {address} refused: {e.code().name}: {e.details()}"
                if e.code() not in RETRYABLE:
                    raise CaRefusedError(text, e.code()) from e
                if attempt == attempts - 1:
                    raise CaUnavailableError(
                        f"CA at {address} unreachable: {e.code().name}: {e.details()}"
                    ) from e
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)
    cert = x509.load_pem_x509_certificates(resp.cert_chain_pem)[0]
    svid = Svid(spiffe_id_of(cert), resp.cert_chain_pem, key_pem, cert.not_valid_after_utc)
    if current is not None and svid.spiffe_id != current.spiffe_id:
        raise IssuanceError(f"CA renewed {current.spiffe_id} as {svid.spiffe_id}")
    return svid
