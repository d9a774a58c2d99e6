"""Obtaining an SVID: generate a key here, send a CSR, get a certificate back.

First issuance goes to the CA's bootstrap port with a join token; renewal goes to its renewal
port over mutual TLS, authenticated by the current SVID (no token). Either way the private key
is generated in this process and never sent.

`wire` picks the gRPC client (issue 17): "h2" (`ca.h2grpc`, which never imports grpc; the
default) or "grpcio" (grpc.aio). Only the one chosen is imported; both speak the same `Sign` call.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from cryptography import x509

from ca.api import ca_pb2
from ca.authority import Svid
from ca.errors import IssuanceError
from ca.keys import new_key_and_csr
from ca.naming import ca_server_name
from ca.verify import spiffe_id_of
from mesh import grpcwire

RETRYABLE = (grpcwire.UNAVAILABLE, grpcwire.DEADLINE_EXCEEDED)
SIGN = "/fedgate.ca.v1.CertificateAuthority/Sign"
Wire = Literal["grpcio", "h2"]


class CaUnavailableError(IssuanceError):
    """The CA could not be reached (after the attempts allowed); the caller may retry later."""


class CaRefusedError(IssuanceError):
    """The CA answered and refused (unknown token, expired or denied SVID, bad CSR)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code  # the gRPC status code (`mesh.grpcwire`), e.g. 7 PERMISSION_DENIED


class _SignFailedError(Exception):
    def __init__(self, code: int, details: str) -> None:
        super().__init__(f"{grpcwire.code_name(code)}: {details}")
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
    wire: Wire = "h2",
) -> Svid:
    """Ask the CA at `address` for an SVID; retries while the CA is unreachable (start-up).

    With `current`, this is a renewal: `address` is the CA's renewal port, the channel
    presents `current` as client certificate and `token` is not sent. The new SVID has the
    same identity. `anchors_pem` must include the root that signed the CA's serving
    certificate (during a rotation: every root of the trust domain).
    """
    key_pem, csr_pem = new_key_and_csr()
    if current is not None:
        token = ""
    request = ca_pb2.SignRequest(csr_pem=csr_pem, token=token, ttl_seconds=ttl_seconds)
    if wire not in ("grpcio", "h2"):
        raise ValueError(f"unknown gRPC client {wire!r}")
    sign = _sign_h2 if wire == "h2" else _sign_grpcio
    call = _Sign(address, anchors_pem, current, ca_server_name(trust_domain), request, rpc_timeout)
    delay = 0.1
    for attempt in range(attempts):
        try:
            resp = await sign(call)
            break
        except _SignFailedError as e:
            if e.code not in RETRYABLE:
                raise CaRefusedError(f"CA at {address} refused: {e}", e.code) from e
            if attempt == attempts - 1:
                raise CaUnavailableError(f"CA at {address} unreachable: {e}") from e
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)
    cert = x509.load_pem_x509_certificates(resp.cert_chain_pem)[0]
    svid = Svid(spiffe_id_of(cert), resp.cert_chain_pem, key_pem, cert.not_valid_after_utc)
    if current is not None and svid.spiffe_id != current.spiffe_id:
        raise IssuanceError(f"CA renewed {current.spiffe_id} as {svid.spiffe_id}")
    return svid


@dataclass(frozen=True, slots=True)
class _Sign:
    """One `Sign` attempt, whichever client makes it."""

    address: str
    anchors_pem: bytes
    current: Svid | None  # renewal: the client certificate
    server_name: str  # the CA's serving name, checked against its certificate
    request: ca_pb2.SignRequest
    rpc_timeout: float


async def _sign_grpcio(call: _Sign) -> ca_pb2.SignResponse:
    import grpc
    import grpc.aio

    from ca.api import ca_pb2_grpc

    current = call.current
    if current is None:
        creds = grpc.ssl_channel_credentials(root_certificates=call.anchors_pem)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=call.anchors_pem,
            private_key=current.key_pem,
            certificate_chain=current.cert_pem,
        )
    options = [("grpc.ssl_target_name_override", call.server_name)]
    async with grpc.aio.secure_channel(call.address, creds, options=options) as channel:
        stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
        try:
            response: ca_pb2.SignResponse = await stub.Sign(call.request, timeout=call.rpc_timeout)
        except grpc.aio.AioRpcError as e:
            raise _SignFailedError(e.code().value[0], e.details() or "") from e
        return response


async def _sign_h2(call: _Sign) -> ca_pb2.SignResponse:
    from ca.h2grpc import H2Channel, RpcError, TlsCredentials

    current = call.current
    creds = (
        TlsCredentials(call.anchors_pem)
        if current is None
        else TlsCredentials(call.anchors_pem, current.cert_pem, current.key_pem)
    )
    try:
        async with asyncio.timeout(call.rpc_timeout):
            channel = await H2Channel.connect(call.address, creds, call.server_name)
            async with channel:
                data = await channel.unary(SIGN, call.request.SerializeToString())
    except TimeoutError as e:
        raise _SignFailedError(grpcwire.DEADLINE_EXCEEDED, "deadline exceeded") from e
    except RpcError as e:
        raise _SignFailedError(e.code, e.details) from e
    return ca_pb2.SignResponse.FromString(data)
