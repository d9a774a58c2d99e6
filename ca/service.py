"""The CA's gRPC `Sign` service: CSR in, SVID out; who is asking decides the identity.

Two ports serve the same service:

* the **bootstrap** port (TLS, server-auth only): first issuance, authenticated by a token that
  a `ca.tokens.TokenAuthenticator` turns into a service account (a join token of the rig's
  table, or a projected ServiceAccount token checked with Kubernetes' TokenReview). The
  account, in the CA's own trust domain, is the identity; the CSR's subject and SANs are not.
* the **renewal** port (mutual TLS, a client certificate required): renewal, authenticated by
  the caller's current SVID. OpenSSL checks the chain against the CA's published roots; then
  `ca.verify` (same trust domain, not expired, not denied) names the identity, and the CA
  re-issues exactly that identity. No token is needed or used.

gRPC's Python API can only *require* a client certificate or not ask for one, so "optional
client certificate on one port" is not available; hence two ports (the renewal port is by
default the bootstrap port + 1, `renew_address_for`).

Both ports present a serving certificate (DNS SAN `ca.<trust-domain>`) that the CA issues
itself from its active root, re-issued at half life and as soon as a rotation activates a new
root; gRPC's dynamic credentials hand new handshakes the new one. A denied identity (the
federation's deny list) gets neither a first SVID nor a renewal. What this module does not
do: decide which roots exist (`ca.cadir`), or store the deny list (fedgate/ wires a source).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ca.api import ca_pb2, ca_pb2_grpc
from ca.authority import DEFAULT_SVID_TTL, CertificateAuthority, Svid, cert_to_pem
from ca.bundle import TrustBundle, denial_of
from ca.errors import DeniedError, IssuanceError, VerificationError
from ca.naming import ca_server_name, dns_names_for, renew_address_for
from ca.tokens import (
    AuthenticatorUnavailableError,
    LookupTokens,
    TokenAuthenticator,
    TokenRefusedError,
)
from ca.verify import utcnow, verify_chain
from mesh.naming import SYSTEM_NAMESPACE, SpiffeId

_log = structlog.get_logger("fedgate.ca")

# A plain lookup is accepted where an authenticator is (the rig's table, tests): `LookupTokens`.
TokenResolver = Callable[[str], SpiffeId | None]
Tokens = TokenAuthenticator | TokenResolver
MIN_TTL = dt.timedelta(seconds=10)


@dataclass(frozen=True, slots=True)
class CaView:
    """What the service issues with right now: the active root, every root it publishes
    (a renewal presenting an SVID of any of them is accepted) and the longest lifetime."""

    issuer: CertificateAuthority
    roots: tuple[x509.Certificate, ...]
    max_ttl: dt.timedelta = DEFAULT_SVID_TTL

    @classmethod
    def of(cls, ca: CertificateAuthority, max_ttl: dt.timedelta = DEFAULT_SVID_TTL) -> CaView:
        return cls(ca, (ca.root,), max_ttl)

    @property
    def roots_pem(self) -> bytes:
        return b"".join(cert_to_pem(r) for r in self.roots)


ViewSource = Callable[[], CaView]
DenySource = Callable[[], frozenset[str]]


def _source(ca: CertificateAuthority | ViewSource, max_ttl: dt.timedelta) -> ViewSource:
    if isinstance(ca, CertificateAuthority):
        view = CaView.of(ca, max_ttl)
        return lambda: view
    return ca


def _authenticator(tokens: Tokens) -> TokenAuthenticator:
    if callable(tokens):
        return LookupTokens(tokens)
    return tokens


def _peer_leaf(
    context: grpc.aio.ServicerContext[ca_pb2.SignRequest, ca_pb2.SignResponse],
) -> bytes | None:
    pems = list(context.auth_context().get("x509_pem_cert", ()))
    if not pems:
        return None
    try:
        return x509.load_pem_x509_certificate(pems[0]).public_bytes(Encoding.DER)
    except ValueError:
        return b""  # verify_chain reports it as unparseable


class SignServicer(ca_pb2_grpc.CertificateAuthorityServicer):
    def __init__(
        self,
        ca: CertificateAuthority | ViewSource,
        tokens: Tokens,
        max_ttl: dt.timedelta = DEFAULT_SVID_TTL,
        now: Callable[[], dt.datetime] = utcnow,
        denied: DenySource = frozenset,
    ) -> None:
        self._view = _source(ca, max_ttl)
        self._tokens = _authenticator(tokens)
        self._now = now
        self._denied = denied
        self.issued = 0  # metrics
        self.renewed = 0
        self.refused = 0

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[ca_pb2.SignRequest, ca_pb2.SignResponse],
        code: grpc.StatusCode,
        reason: str,
        **fields: str,
    ) -> None:
        self.refused += 1
        _log.warning("sign refused", peer=context.peer(), reason=reason, **fields)
        await context.abort(code, reason)

    async def _authenticate(
        self,
        token: str,
        trust_domain: str,
        context: grpc.aio.ServicerContext[ca_pb2.SignRequest, ca_pb2.SignResponse],
    ) -> SpiffeId:
        """The identity the bootstrap token proves, in this CA's trust domain, or abort."""
        if not token:
            await self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, "missing token")
        try:
            account = await self._tokens.authenticate(token)
        except TokenRefusedError as e:
            await self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, f"token refused: {e}")
            raise  # unreachable: abort raises
        except AuthenticatorUnavailableError as e:
            await self._refuse(
                context, grpc.StatusCode.UNAVAILABLE, f"cannot authenticate the token now: {e}"
            )
            raise  # unreachable: abort raises
        return account.spiffe_id(trust_domain)

    async def Sign(  # noqa: N802 - gRPC method name
        self,
        request: ca_pb2.SignRequest,
        context: grpc.aio.ServicerContext[ca_pb2.SignRequest, ca_pb2.SignResponse],
    ) -> ca_pb2.SignResponse:
        view = self._view()
        now = self._now()
        leaf = _peer_leaf(context)
        renewal = leaf is not None
        if leaf is not None:
            # Renewal: the current SVID is the credential. Only this CA's own roots (and
            # trust domain) vouch; the deny list applies.
            bundle = TrustBundle.from_pem({view.issuer.trust_domain: [view.roots_pem]})
            try:
                spiffe_id = verify_chain([leaf], bundle.with_denied(self._denied()), now)
            except VerificationError as e:
                code = grpc.StatusCode.UNAUTHENTICATED
                if isinstance(e, DeniedError):
                    code = grpc.StatusCode.PERMISSION_DENIED
                await self._refuse(context, code, f"renewal refused: {e}")
                raise  # unreachable: abort raises
        else:
            spiffe_id = await self._authenticate(request.token, view.issuer.trust_domain, context)
            entry = denial_of(spiffe_id, self._denied())
            if entry is not None:
                await self._refuse(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{spiffe_id} is denied by the federation's deny list ({entry})",
                    spiffe_id=spiffe_id.uri,
                )
        ttl = view.max_ttl
        if request.ttl_seconds:
            ttl = max(MIN_TTL, min(ttl, dt.timedelta(seconds=request.ttl_seconds)))
        try:
            cert = view.issuer.sign_csr(
                request.csr_pem, spiffe_id, now, ttl, dns_names_for(spiffe_id)
            )
        except IssuanceError as e:
            await self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, str(e), spiffe_id=spiffe_id.uri
            )
            raise  # unreachable: abort raises
        if renewal:
            self.renewed += 1
        else:
            self.issued += 1
        _log.info(
            "svid renewed" if renewal else "svid issued",
            peer=context.peer(),
            spiffe_id=spiffe_id.uri,
            ttl_s=ttl.total_seconds(),
            root=view.issuer.root_id,
        )
        return ca_pb2.SignResponse(
            cert_chain_pem=cert, trust_anchors_pem=view.roots_pem, spiffe_id=spiffe_id.uri
        )


class SelfIssued:
    """An identity a process issues itself (the CA's serving certificate, the controller's),
    re-issued at half life or as soon as `generation()` changes (a new active root).

    Read from gRPC's credential fetcher on every new handshake (any thread), hence the lock:
    renewal is pulled by handshakes, so no timer task is needed and an idle server renews on
    the next handshake, before it presents the certificate."""

    def __init__(
        self,
        issue: Callable[[dt.datetime], Svid],
        generation: Callable[[], object] = lambda: None,
        now: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._issue_at = issue
        self._generation = generation
        self._now = now
        self._lock = threading.Lock()
        self._svid, self._gen, self._renew_at = self._issue()

    def _issue(self) -> tuple[Svid, object, dt.datetime]:
        gen = self._generation()
        now = self._now()
        svid = self._issue_at(now)
        return svid, gen, now + (svid.not_after - now) / 2

    def current(self) -> tuple[Svid, bool]:
        """The SVID to present now, and whether it changed since the last call."""
        with self._lock:
            if self._generation() != self._gen or self._now() >= self._renew_at:
                self._svid, self._gen, self._renew_at = self._issue()
                _log.info(
                    "own certificate renewed",
                    spiffe_id=self._svid.spiffe_id.uri,
                    not_after=self._svid.not_after.isoformat(),
                )
                return self._svid, True
            return self._svid, False

    @property
    def svid(self) -> Svid:
        return self.current()[0]


def serving_identity(view: ViewSource, now: Callable[[], dt.datetime] = utcnow) -> SelfIssued:
    """The CA's serving certificate (DNS SAN `ca.<trust-domain>`) from its active root."""

    def issue(at: dt.datetime) -> Svid:
        ca = view().issuer
        ident = SpiffeId(ca.trust_domain, SYSTEM_NAMESPACE, "ca")
        return ca.issue(ident, at, dns_names=(ca_server_name(ca.trust_domain),))

    return SelfIssued(issue, lambda: view().issuer.root_id, now)


def dynamic_server_credentials(
    current: Callable[[], tuple[Svid, bytes]], *, mutual: bool
) -> grpc.ServerCredentials:
    """TLS server credentials that follow `current()`: (own SVID, client roots PEM).

    gRPC asks the fetcher on each new handshake, so a renewed certificate or a changed set of
    roots is presented from the next handshake on, without restarting the server or dropping
    streams. `mutual` requires a client certificate chaining to those roots.
    """
    last: list[bytes] = [b""]

    def config() -> tuple[grpc.ServerCertificateConfiguration, bytes]:
        svid, roots = current()
        stamp = svid.cert_pem + roots
        pair = [(svid.key_pem, svid.cert_pem)]
        return grpc.ssl_server_certificate_configuration(pair, roots or None), stamp

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        cfg, stamp = config()
        if stamp == last[0]:
            return None
        last[0] = stamp
        return cfg

    initial, last[0] = config()
    return grpc.dynamic_ssl_server_credentials(
        initial,
        fetch,  # type: ignore[arg-type]  # grpc documents None as "unchanged"; stubs omit it
        require_client_authentication=mutual,
    )


async def serve(
    ca: CertificateAuthority | ViewSource,
    tokens: Tokens,
    listen: str,
    max_ttl: dt.timedelta = DEFAULT_SVID_TTL,
    *,
    renew_listen: str | None = None,
    denied: DenySource = frozenset,
) -> grpc.aio.Server:
    """Serve `Sign` on `listen` (bootstrap, authenticated by `tokens`) and `renew_listen`
    (renewal; default port + 1)."""
    view = _source(ca, max_ttl)
    server = grpc.aio.server()
    ca_pb2_grpc.add_CertificateAuthorityServicer_to_server(
        SignServicer(view, tokens, max_ttl, denied=denied), server
    )
    identity = serving_identity(view)
    renew_listen = renew_listen or renew_address_for(listen)

    def serving(mutual: bool) -> Callable[[], tuple[Svid, bytes]]:
        # Renewal is mutual TLS: clients present the SVID they renew, chaining to our roots.
        return lambda: (identity.current()[0], view().roots_pem if mutual else b"")

    for address, mutual in ((listen, False), (renew_listen, True)):
        credentials = dynamic_server_credentials(serving(mutual), mutual=mutual)
        if server.add_secure_port(address, credentials) == 0:
            raise IssuanceError(f"cannot listen on {address}")
    await server.start()
    _log.info(
        "ca serving",
        listen=listen,
        renew_listen=renew_listen,
        trust_domain=view().issuer.trust_domain,
        root=view().issuer.root_id,
    )
    return server
