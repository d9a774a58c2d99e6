"""TLS 1.3 session resumption for the sidecar's outbound mTLS, as Envoy's upstream TLS does.

A full mutual-TLS handshake costs both sidecars a signature and a chain verification each
(~150-200 per second per process on this class of machine): with one handshake per application
connection it is the first limit a burst of new connections hits. The destination sidecar sends
session tickets after every handshake; presenting one on the next connection to the same
destination makes the handshake a PSK resumption (ECDHE still runs, so forward secrecy holds).

What stays checked: after a resumed handshake the peer's certificate (kept in the session) is
verified again by `ca.tls.peer_identity` against the current bundle, deny list, clock and the
identities the route allows, exactly as after a full one. A ticket outlives nothing: tickets are
only valid with the SSL context that received them (a new SVID or trust bundle means a new
context, hence full handshakes), and the destination refuses tickets from before its own context
changed (OpenSSL falls back to a full handshake, costing nothing but the saving).

Keys name a destination: a local endpoint's address, or (remote cluster, service, port) — the
remote ingress gateway picks the endpoint, so a ticket may reach another sidecar than the one
that issued it; that one does a full handshake and its ticket replaces the old one.
"""

from __future__ import annotations

import ssl
from collections import OrderedDict
from collections.abc import Hashable

MAX_SESSIONS = 1024  # destinations remembered; the least recently used is forgotten


class SessionCache:
    """The last session ticket per destination, valid only with the context that got it."""

    def __init__(self, max_sessions: int = MAX_SESSIONS) -> None:
        self._max = max_sessions
        self._sessions: OrderedDict[Hashable, tuple[ssl.SSLContext, ssl.SSLSession]] = OrderedDict()
        self.resumed = 0  # metrics: handshakes that resumed, and full ones
        self.full = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, key: Hashable, ctx: ssl.SSLContext) -> ssl.SSLSession | None:
        entry = self._sessions.get(key)
        if entry is None:
            return None
        if entry[0] is not ctx:  # a new SVID or bundle since: the ticket is not ours to use
            del self._sessions[key]
            return None
        self._sessions.move_to_end(key)
        return entry[1]

    def done(self, key: Hashable, ctx: ssl.SSLContext, ssl_obj: ssl.SSLObject) -> None:
        """Record a finished handshake (after the peer's first bytes, which carry TLS 1.3's
        tickets) and keep its session for the next connection to `key`."""
        if ssl_obj.session_reused:
            self.resumed += 1
        else:
            self.full += 1
        session = ssl_obj.session
        if session is None or not session.has_ticket:
            return
        self._sessions[key] = (ctx, session)
        self._sessions.move_to_end(key)
        while len(self._sessions) > self._max:
            self._sessions.popitem(last=False)

    def clear(self) -> None:
        self._sessions.clear()

    def status(self) -> dict[str, int]:
        return {"cached": len(self._sessions), "resumed": self.resumed, "full": self.full}
