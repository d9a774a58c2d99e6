"""TLS 1.3 contexts for mutually authenticated SPIFFE connections (Python `ssl`).

OpenSSL validates the chain against every root in the bundle; `peer_identity` then applies the
trust-domain-scoped SPIFFE check of `ca.verify`, which OpenSSL cannot express. Both steps are
required: a context alone accepts a west-signed certificate that claims an east identity.

`ssl` loads keys only from files, so the key is handed over through an anonymous in-memory file
(memfd) that exists only inside this process: the key never touches a disk or another process.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from ca.authority import Svid
from ca.bundle import TrustBundle
from ca.errors import VerificationError
from ca.memkey import load_pem_chain
from ca.verify import utcnow, verify_chain
from mesh.naming import SpiffeId


def _load_svid(ctx: ssl.SSLContext, svid: Svid) -> None:
    load_pem_chain(ctx, svid.cert_pem, svid.key_pem)


def _base(purpose: ssl.Purpose, svid: Svid, bundle: TrustBundle) -> ssl.SSLContext:
    roots = bundle.all_roots_pem().decode()
    if not roots:
        raise VerificationError("trust bundle is empty: cannot verify any peer")
    # Only the bundle's roots: given no `cadata`, a client context would also load the system's
    # public CAs (~140 certificates, ~0.95 MiB per context; issue 17), which no mesh peer
    # chains to, and would let OpenSSL accept a public-CA chain (`peer_identity` refuses it).
    ctx = ssl.create_default_context(purpose, cadata=roots)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SPIFFE IDs live in URI SANs; `peer_identity` checks them.
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_svid(ctx, svid)
    return ctx


def server_context(svid: Svid, bundle: TrustBundle, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """A server context that requires and verifies a client certificate."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH, svid, bundle)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def client_context(svid: Svid, bundle: TrustBundle, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    ctx = _base(ssl.Purpose.SERVER_AUTH, svid, bundle)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def peer_identity(
    ssl_object: ssl.SSLObject | ssl.SSLSocket,
    bundle: TrustBundle,
    allowed: Callable[[SpiffeId], bool] | None = None,
) -> SpiffeId:
    """The verified SPIFFE ID of the peer, or VerificationError saying why it was refused."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise VerificationError("peer presented no certificate")
    spiffe_id = verify_chain([der], bundle, utcnow())
    if allowed is not None and not allowed(spiffe_id):
        raise VerificationError(f"identity {spiffe_id} is not allowed here")
    return spiffe_id


def load_svid(ctx: ssl.SSLContext, svid: Svid) -> None:
    """Replace the certificate `ctx` presents; connections made from now on use `svid`."""
    _load_svid(ctx, svid)


def webhook_server_context(svid: Svid) -> ssl.SSLContext:
    """A server context presenting `svid` and asking for no client certificate: for a
    Kubernetes admission webhook, which the API server checks by `caBundle` and DNS SAN."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    _load_svid(ctx, svid)
    return ctx
