"""Mutual TLS for the QUIC tunnel: the one place fedgate completes aioquic's TLS 1.3 stack.

Why this module exists. aioquic 1.7 never authenticates a *client*: its `tls.Context` asks for
a client certificate only behind a private, test-only flag (`_request_client_certificate`), and
`_server_handle_certificate` accepts an empty Certificate message and never validates a chain
(it does check CertificateVerify, i.e. proof of key possession). Upstream: aiortc/aioquic
issues 541, 548 and 586. A gateway that accepted any QUIC client would let anyone on the WAN
open streams into the cluster, so mTLS is completed here, confined to this module, pinned to
the aioquic version whose internals it relies on (checked at import, see `_check_aioquic`).

What it does, during the handshake (so a refused peer never gets 1-RTT keys, hence no stream):

* server side: requests a client certificate; an empty client Certificate is refused with
  `certificate_required` (RFC 8446 §4.4.2.4, §6.2); after aioquic has checked CertificateVerify,
  the client's chain is verified with `ca.verify.verify_certs` against the *current* trust
  bundle (trust-domain scoped, SPIFFE federation), then the policy's authorization callback
  decides whether that identity may connect (`access_denied` if not, `bad_certificate` for a
  chain that does not verify). Session resumption is refused outright (a PSK handshake would
  skip client authentication): a server connection must have no session-ticket fetcher.
* client side: aioquic already checks the server chain against `cadata` and the server name
  (the gateway DNS SAN); we additionally run the same trust-domain-scoped `ca.verify` check and
  the authorization callback (the peer must be the expected gateway identity).

After the handshake the driver calls `MtlsQuicConnection.authenticated_peer()`, which re-runs
the verification on the recorded chain and closes the connection if anything is missing.

What it deliberately does not do: choose who may connect (that is the `PeerPolicy` callback),
load keys, or touch anything outside the TLS handshake.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import aioquic
import structlog
from aioquic import tls
from aioquic._buffer import Buffer
from aioquic.quic.connection import QuicConnection
from cryptography import x509

from ca.bundle import TrustBundle
from ca.errors import VerificationError
from ca.verify import MAX_CHAIN, utcnow, verify_certs
from mesh.naming import SpiffeId

SUPPORTED_AIOQUIC = "1.7."

_TLS_PRIVATE_METHODS = (
    "_server_handle_certificate",
    "_server_handle_certificate_verify",
    "_client_handle_certificate_verify",
)
_TLS_PRIVATE_ATTRS = (
    "_request_client_certificate",
    "_peer_certificate",
    "_peer_certificate_chain",
    "get_session_ticket_cb",
)


def _check_aioquic() -> None:
    """Refuse to import against an aioquic whose internals we have not reviewed."""
    version = getattr(aioquic, "__version__", "?")
    if not version.startswith(SUPPORTED_AIOQUIC):
        raise ImportError(
            f"gateway.quic_mtls completes client-certificate verification against aioquic "
            f"{SUPPORTED_AIOQUIC}x internals; found aioquic {version}. Review tls.Context "
            f"(client certificate handling) and update this module before changing the pin."
        )
    probe = tls.Context(is_client=False)
    missing = [a for a in _TLS_PRIVATE_ATTRS if not hasattr(probe, a)]
    missing += [m for m in _TLS_PRIVATE_METHODS if not callable(getattr(probe, m, None))]
    missing += [
        s
        for s in ("SERVER_EXPECT_CERTIFICATE_VERIFY", "SERVER_EXPECT_FINISHED")
        if not hasattr(tls.State, s)
    ]
    if not callable(getattr(QuicConnection, "_initialize", None)):
        missing.append("QuicConnection._initialize")
    if missing:
        raise ImportError(
            f"aioquic {version} lacks internals gateway.quic_mtls relies on: {', '.join(missing)}"
        )


_check_aioquic()

_log = structlog.get_logger("fedgate.gateway.mtls")


class AlertCertificateRequired(tls.Alert):
    """RFC 8446 §4.4.2.4: a server requiring client auth answers an empty Certificate so."""

    description = tls.AlertDescription.certificate_required


class AlertAccessDenied(tls.Alert):
    """RFC 8446 §6.2: a valid certificate whose identity may not connect."""

    description = tls.AlertDescription.access_denied


Authorizer = Callable[[SpiffeId], str | None]
"""Returns None to allow the verified identity, or the reason it is refused."""


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    """What a handshake checks about its peer. `bundle` is read at each handshake, so a new
    trust bundle applies to every handshake that starts after it is installed."""

    bundle: Callable[[], TrustBundle]
    authorize: Authorizer
    now: Callable[[], dt.datetime] = utcnow


class MtlsQuicConnection(QuicConnection):
    """A QuicConnection whose handshake authenticates both peers (see module docstring)."""

    def __init__(self, *, peer_policy: PeerPolicy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.peer_policy = peer_policy
        self.peer_identity: SpiffeId | None = None
        self.refusal: str | None = None
        self.log: Any = _log

    # aioquic creates the tls.Context here (client: connect(); server: first Initial).
    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        ctx = self.tls
        if self._is_client:
            original = ctx._client_handle_certificate_verify

            def client_certificate_verify(input_buf: Buffer) -> None:
                original(input_buf)  # signature, then aioquic's chain + server-name check
                self.peer_identity = self._verify_peer(ctx, "server")

            ctx._client_handle_certificate_verify = client_certificate_verify  # type: ignore[method-assign]
            return

        if ctx.get_session_ticket_cb is not None:
            # A resumed (PSK) handshake sends no CertificateRequest: no client auth at all.
            raise RuntimeError("mTLS server connections must not enable session resumption")
        ctx._request_client_certificate = True
        original_cert = ctx._server_handle_certificate
        original_verify = ctx._server_handle_certificate_verify

        def server_certificate(input_buf: Buffer) -> None:
            original_cert(input_buf)
            if ctx.state is not tls.State.SERVER_EXPECT_CERTIFICATE_VERIFY:
                # aioquic took the "continue without client authentication" branch.
                self._refuse(AlertCertificateRequired, "client presented no certificate")

        def server_certificate_verify(input_buf: Buffer) -> None:
            original_verify(input_buf)  # proof of possession of the certificate's key
            self.peer_identity = self._verify_peer(ctx, "client")

        ctx._server_handle_certificate = server_certificate  # type: ignore[method-assign]
        ctx._server_handle_certificate_verify = server_certificate_verify  # type: ignore[method-assign]

    def authenticated_peer(self) -> SpiffeId:
        """After HandshakeCompleted: the verified peer identity, re-checked; raises
        VerificationError if the handshake somehow completed without one."""
        if self.peer_identity is None:
            raise VerificationError("handshake completed without an authenticated peer")
        chain = self._peer_chain(self.tls)
        if chain is None:
            raise VerificationError("handshake completed without a peer certificate")
        spiffe_id = verify_certs(chain, self.peer_policy.bundle(), self.peer_policy.now())
        if spiffe_id != self.peer_identity:
            raise VerificationError(f"peer identity changed to {spiffe_id}")
        return spiffe_id

    # --- private -------------------------------------------------------------------------

    @staticmethod
    def _peer_chain(ctx: tls.Context) -> list[x509.Certificate] | None:
        leaf = ctx._peer_certificate
        if leaf is None:
            return None
        return [leaf, *ctx._peer_certificate_chain]

    def _verify_peer(self, ctx: tls.Context, side: str) -> SpiffeId:
        chain = self._peer_chain(ctx)
        if chain is None:
            self._refuse(AlertCertificateRequired, f"{side} presented no certificate")
        if len(chain) > MAX_CHAIN:
            self._refuse(tls.AlertBadCertificate, f"{side} chain longer than {MAX_CHAIN}")
        try:
            spiffe_id = verify_certs(chain, self.peer_policy.bundle(), self.peer_policy.now())
        except VerificationError as e:
            self._refuse(tls.AlertBadCertificate, f"{side} certificate refused: {e}")
        except Exception as e:  # a policy bug must fail closed, never escape the handshake
            self._refuse(tls.AlertInternalError, f"{side} certificate check failed: {e!r}")
        try:
            denied = self.peer_policy.authorize(spiffe_id)
        except Exception as e:
            self._refuse(tls.AlertInternalError, f"authorization of {spiffe_id} failed: {e!r}")
        if denied is not None:
            self._refuse(AlertAccessDenied, f"{side} {spiffe_id} not authorized: {denied}")
        return spiffe_id

    def _refuse(self, alert: type[tls.Alert], reason: str) -> NoReturn:
        self.refusal = reason
        self.log.warning(
            "tunnel handshake refused",
            reason=reason,
            alert=alert.description.name,
            peer_addr=_addr(self),
        )
        raise alert(reason)


def _addr(conn: QuicConnection) -> str:
    addr = conn.get_peer_address()
    return f"{addr[0]}:{addr[1]}" if addr else "?"
