"""The CA's gRPC `Sign` service: CSR in, SVID out, identity decided by the bootstrap token.

The server authenticates itself with a certificate its own CA issues in-process (DNS SAN
`ca.<trust-domain>`), so a workload that holds only the cluster root can trust it. This version
authenticates callers by join token only; renewal by the current SVID comes with rotation.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import grpc
import structlog

from ca.api import ca_pb2, ca_pb2_grpc
from ca.authority import DEFAULT_SVID_TTL, CertificateAuthority, Svid
from ca.errors import IssuanceError
from ca.verify import utcnow
from mesh.naming import SYSTEM_NAMESPACE, SpiffeId

_log = structlog.get_logger("fedgate.ca")

TokenResolver = Callable[[str], SpiffeId | None]
MIN_TTL = dt.timedelta(seconds=10)


def ca_server_name(trust_domain: str) -> str:
    return f"ca.{trust_domain}"


def dns_names_for(spiffe_id: SpiffeId) -> tuple[str, ...]:
    """Gateways also carry a DNS SAN so QUIC/TLS peers can verify them by name."""
    if spiffe_id.namespace == SYSTEM_NAMESPACE and spiffe_id.service_account == "gateway":
        return (f"gateway.{spiffe_id.trust_domain}",)
    return ()


class SignServicer(ca_pb2_grpc.CertificateAuthorityServicer):
    def __init__(
        self,
        ca: CertificateAuthority,
        resolve_token: TokenResolver,
        max_ttl: dt.timedelta = DEFAULT_SVID_TTL,
        now: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._ca = ca
        self._resolve = resolve_token
        self._max_ttl = max_ttl
        self._now = now

    async def Sign(  # noqa: N802 - gRPC method name
        self,
        request: ca_pb2.SignRequest,
        context: grpc.aio.ServicerContext[ca_pb2.SignRequest, ca_pb2.SignResponse],
    ) -> ca_pb2.SignResponse:
        peer = context.peer()
        spiffe_id = self._resolve(request.token) if request.token else None
        if spiffe_id is None:
            _log.warning("sign refused", peer=peer, reason="unknown or missing join token")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or missing join token")
        assert spiffe_id is not None
        ttl = self._max_ttl
        if request.ttl_seconds:
            ttl = max(MIN_TTL, min(ttl, dt.timedelta(seconds=request.ttl_seconds)))
        try:
            cert = self._ca.sign_csr(
                request.csr_pem, spiffe_id, self._now(), ttl, dns_names_for(spiffe_id)
            )
        except IssuanceError as e:
            _log.warning("sign refused", peer=peer, spiffe_id=spiffe_id.uri, reason=str(e))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise  # unreachable: abort raises
        _log.info("svid issued", peer=peer, spiffe_id=spiffe_id.uri, ttl_s=ttl.total_seconds())
        return ca_pb2.SignResponse(
            cert_chain_pem=cert, trust_anchors_pem=self._ca.root_pem, spiffe_id=spiffe_id.uri
        )


def server_credentials(ca: CertificateAuthority) -> tuple[grpc.ServerCredentials, Svid]:
    """TLS (server-auth) credentials for the Sign endpoint, issued by `ca` in this process."""
    ident = SpiffeId(ca.trust_domain, SYSTEM_NAMESPACE, "ca")
    svid = ca.issue(ident, utcnow(), dns_names=(ca_server_name(ca.trust_domain),))
    return grpc.ssl_server_credentials([(svid.key_pem, svid.cert_pem)]), svid


async def serve(
    ca: CertificateAuthority,
    resolve_token: TokenResolver,
    listen: str,
    max_ttl: dt.timedelta = DEFAULT_SVID_TTL,
) -> grpc.aio.Server:
    server = grpc.aio.server()
    ca_pb2_grpc.add_CertificateAuthorityServicer_to_server(
        SignServicer(ca, resolve_token, max_ttl), server
    )
    creds, _ = server_credentials(ca)
    if server.add_secure_port(listen, creds) == 0:
        raise IssuanceError(f"cannot listen on {listen}")
    await server.start()
    _log.info("ca serving", listen=listen, trust_domain=ca.trust_domain)
    return server
