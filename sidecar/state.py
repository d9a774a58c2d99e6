"""What a new connection runs on: routes, trust bundle, TLS contexts, one immutable value.

`Sidecar` replaces it whole on every snapshot or identity change; each connection takes the
current value once when it starts, so existing connections keep theirs and new ones get the new.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from ca.authority import Svid
from ca.bundle import EMPTY_BUNDLE, TrustBundle
from sidecar.routes import RouteTable


@dataclass(frozen=True, slots=True)
class ProxyState:
    routes: RouteTable
    bundle: TrustBundle = EMPTY_BUNDLE
    svid: Svid | None = None
    client_ctx: ssl.SSLContext | None = None  # None until there are an SVID and a bundle
    server_ctx: ssl.SSLContext | None = None  # offers ALPN fedgate-smux/1 (sidecar.smux)
    mux_ctx: ssl.SSLContext | None = None  # client_ctx's twin offering fedgate-smux/1
