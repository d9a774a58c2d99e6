"""Obtaining an SVID: generate a key here, send a CSR, get a certificate back."""

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


async def obtain_svid(
    address: str,
    token: str,
    anchors_pem: bytes,
    trust_domain: str,
    ttl_seconds: int = 0,
    attempts: int = 30,
) -> Svid:
    """Ask the CA at `address` for an SVID; retries while the CA is unreachable (start-up)."""
    key_pem, csr_pem = new_key_and_csr()
    creds = grpc.ssl_channel_credentials(root_certificates=anchors_pem)
    options = [("grpc.ssl_target_name_override", ca_server_name(trust_domain))]
    delay = 0.1
    for attempt in range(attempts):
        async with grpc.aio.secure_channel(address, creds, options=options) as channel:
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            try:
                resp = await stub.Sign(
                    ca_pb2.SignRequest(csr_pem=csr_pem, token=token, ttl_seconds=ttl_seconds),
                    timeout=5,
                )
                break
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE or attempt == attempts - 1:
                    raise IssuanceError(
                        f"CA at {address} refused: {e.code().name}: {e.details()}"
                    ) from e
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)
    cert = x509.load_pem_x509_certificates(resp.cert_chain_pem)[0]
    return Svid(spiffe_id_of(cert), resp.cert_chain_pem, key_pem, cert.not_valid_after_utc)
