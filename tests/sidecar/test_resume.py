"""SessionCache with real TLS 1.3 handshakes back to back in memory."""

from __future__ import annotations

import ssl

from ca.tls import client_context, peer_identity, server_context
from sidecar.resume import SessionCache
from sidecar.tlsio import TlsSession
from tests.sidecar.conftest import EAST, Pki, spiffe, tls_in_memory


def handshake(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[TlsSession, TlsSession]:
    client, server = tls_in_memory(client_ctx, server_ctx, session)
    server.send(b"reply")  # TLS 1.3 tickets ride ahead of the server's first bytes
    client.feed(server.outgoing())
    assert client.read() == [b"reply"]
    return client, server


def test_the_second_handshake_resumes_and_both_identities_survive(pki: Pki) -> None:
    cctx = client_context(pki.svid(pki.east, spiffe(EAST, "c")), pki.bundle)
    sctx = server_context(pki.svid(pki.east, spiffe(EAST, "s")), pki.bundle)
    cache = SessionCache()
    assert cache.get("a", cctx) is None
    client, _ = handshake(cctx, sctx, None)
    cache.done("a", cctx, client.obj)
    client, server = handshake(cctx, sctx, cache.get("a", cctx))
    assert client.obj.session_reused
    cache.done("a", cctx, client.obj)
    assert cache.status() == {"cached": 1, "resumed": 1, "full": 1}
    assert peer_identity(client.obj, pki.bundle).uri.endswith("/sa/s")
    assert peer_identity(server.obj, pki.bundle).uri.endswith("/sa/c")


def test_a_ticket_is_only_offered_with_the_context_that_got_it(pki: Pki) -> None:
    cctx = client_context(pki.svid(pki.east, spiffe(EAST, "c")), pki.bundle)
    sctx = server_context(pki.svid(pki.east, spiffe(EAST, "s")), pki.bundle)
    cache = SessionCache()
    client, _ = handshake(cctx, sctx, None)
    cache.done("a", cctx, client.obj)
    renewed = client_context(pki.svid(pki.east, spiffe(EAST, "c")), pki.bundle)
    assert cache.get("a", renewed) is None
    assert len(cache) == 0  # and it is forgotten


def test_the_least_recently_used_destination_is_forgotten(pki: Pki) -> None:
    cctx = client_context(pki.svid(pki.east, spiffe(EAST, "c")), pki.bundle)
    sctx = server_context(pki.svid(pki.east, spiffe(EAST, "s")), pki.bundle)
    cache = SessionCache(max_sessions=2)
    for key in ("a", "b"):
        client, _ = handshake(cctx, sctx, None)
        cache.done(key, cctx, client.obj)
    assert cache.get("a", cctx) is not None  # "a" is now the most recent
    client, _ = handshake(cctx, sctx, None)
    cache.done("c", cctx, client.obj)
    assert cache.get("b", cctx) is None
    assert cache.get("a", cctx) is not None
    assert cache.get("c", cctx) is not None
