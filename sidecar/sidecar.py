"""The per-pod sidecar: outbound and inbound proxies and clusterset DNS, fed from outside.

The wiring (fedgate/) obtains the SVID from the CA and snapshots from the config stream and
hands them in with `set_identity` and `apply`; this class never fetches either. Every change
builds a new immutable `ProxyState` (routes, trust bundle, TLS contexts): new connections use
it, connections already running keep the state they started with.

The process must already run with the capture GID (`sidecar.capture.drop_to_capture_gid`)
before `start()` when capture is on, or its own connections would be captured too.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import structlog

from ca.authority import Svid
from ca.bundle import TrustBundle
from ca.errors import CAError
from ca.tls import client_context, server_context
from mesh.model import Snapshot
from mesh.naming import ServiceKey
from mesh.telemetry import OFF, Telemetry
from sidecar.capture import CaptureConfig, capture_rules, install, original_dst
from sidecar.dns import DnsServer
from sidecar.errors import ConfigRejectedError
from sidecar.inbound import Inbound, close_denied
from sidecar.outbound import OriginalDst, Outbound
from sidecar.routes import RouteTable
from sidecar.settings import SidecarSettings
from sidecar.smux import ALPN as SMUX_ALPN
from sidecar.state import ProxyState

_log = structlog.get_logger("fedgate.sidecar")

__all__ = ["Sidecar", "SidecarSettings"]


class Sidecar:
    def __init__(
        self,
        settings: SidecarSettings,
        bootstrap_anchors: TrustBundle,
        *,
        rng: random.Random | None = None,
        original_dst_of: OriginalDst = original_dst,
        telemetry: Telemetry = OFF,
    ) -> None:
        """`bootstrap_anchors`: roots known before any snapshot (at least the own cluster's)."""
        self.settings = settings
        self._anchors = bootstrap_anchors
        self._snapshot: Snapshot | None = None
        self._state = ProxyState(RouteTable.empty(settings.cluster), bootstrap_anchors)
        self.outbound = Outbound(settings, self.state, rng, original_dst_of, telemetry=telemetry)
        self.inbound = Inbound(settings, self.state, telemetry)
        self.dns: DnsServer | None = None
        self._started = False

    # -- configuration --------------------------------------------------------------------

    def state(self) -> ProxyState:
        """The state a connection starting now uses."""
        return self._state

    def set_identity(self, svid: Svid) -> None:
        """Use `svid` for new connections (first identity or a rotation)."""
        self._state = self._build(self._state.routes, self._state.bundle, svid)
        _log.info(
            "sidecar identity",
            pod=self.settings.pod,
            spiffe_id=svid.spiffe_id.uri,
            not_after=svid.not_after.isoformat(),
        )

    def apply(self, snapshot: Snapshot) -> None:
        """Route and verify by `snapshot` from now on; ConfigRejectedError keeps the old one
        (the wiring NACKs the version with the message)."""
        try:
            bundle = (
                TrustBundle.from_pem(snapshot.trust_bundle)
                .with_denied(snapshot.denied)
                .merged(self._anchors)
            )
        except CAError as e:
            raise ConfigRejectedError(f"snapshot {snapshot.version}: {e}") from e
        routes = RouteTable.build(snapshot, self.settings.cluster)
        self._state = self._build(routes, bundle, self._state.svid)
        self._snapshot = snapshot
        # Requests in flight keep their config; idle pooled connections to endpoints that left
        # the catalog are closed, and so is their outlier state.
        self.outbound.http.prune(routes)
        self.outbound.h2.prune(routes)
        # Revocation also ends established connections of a denied peer (either direction).
        self.inbound.close_denied(bundle)
        # So do open streams whose caller the service's AuthorizationPolicies no longer admit.
        self.inbound.enforce(routes)
        close_denied(self.outbound.live, bundle, "outbound")
        self.outbound.pool.close_denied(bundle)
        # Pooled connections to a peer the new routes no longer allow are closed too.
        self.outbound.pool.revalidate(routes)
        _log.info(
            "sidecar config applied",
            pod=self.settings.pod,
            version=snapshot.version,
            services=len(routes.vips),
            routes=len(routes.routes),
        )

    def _build(self, routes: RouteTable, bundle: TrustBundle, svid: Svid | None) -> ProxyState:
        if svid is None:
            return ProxyState(routes, bundle)
        old = self._state
        if (
            old.svid is svid
            and old.client_ctx is not None
            and old.server_ctx is not None
            and old.bundle.all_roots_pem() == bundle.all_roots_pem()
        ):
            # Same key and roots (most snapshots change endpoints only): keep the contexts, so
            # their session tickets stay valid and nothing is loaded again. The deny list is
            # checked per handshake from `bundle`, not by the contexts.
            return ProxyState(routes, bundle, svid, old.client_ctx, old.server_ctx, old.mux_ctx)
        # Multiplexing off: neither offered to destinations nor accepted from callers, who
        # then fall back to one connection per call.
        alpn = (SMUX_ALPN,) if self.settings.multiplex else ()
        try:
            return ProxyState(
                routes,
                bundle,
                svid,
                client_context(svid, bundle),
                server_context(svid, bundle, alpn=alpn),
                client_context(svid, bundle, alpn=alpn) if alpn else None,
            )
        except (CAError, OSError, ValueError) as e:  # ssl.SSLError is an OSError
            raise ConfigRejectedError(f"cannot build TLS contexts for {svid!r}: {e}") from e

    def ready(self) -> bool:
        """An identity and a snapshot are in place (the `/readyz` answer)."""
        return self._state.svid is not None and self._snapshot is not None

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        if s.capture:
            rules = capture_rules(CaptureConfig(s.outbound_port, s.inbound_port, s.proxy_gid))
            await asyncio.to_thread(install, rules)
        try:
            await self.inbound.start()
            await self.outbound.start()
            self.dns = await DnsServer.start(s.dns_host, s.dns_port, self._lookup, s.dns_ttl)
        except BaseException:
            await self.aclose()
            raise
        self._started = True
        _log.info(
            "sidecar started",
            pod=s.pod,
            cluster=s.cluster,
            inbound=self.inbound.address,
            outbound=self.outbound.address,
            dns=self.dns.address,
        )

    async def aclose(self) -> None:
        if self.dns is not None:
            self.dns.close()
        await self.outbound.aclose()
        await self.inbound.aclose()
        self._started = False

    def _lookup(self, key: ServiceKey) -> str | None:
        return self._state.routes.vip_of(key)

    # -- admin ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What this sidecar runs on, for the admin `/config` endpoint (JSON-serialisable)."""
        st = self._state
        s = self.settings
        return {
            "pod": s.pod,
            "namespace": s.namespace,
            "cluster": s.cluster,
            "ready": self.ready(),
            "version": st.routes.version,
            "identity": st.svid.spiffe_id.uri if st.svid else None,
            "identity_not_after": st.svid.not_after.isoformat() if st.svid else None,
            "trust_domains": {td: len(rs) for td, rs in sorted(st.bundle.roots.items())},
            "gateway": (
                f"{st.routes.egress.host}:{st.routes.egress.port}" if st.routes.egress else None
            ),
            "services": [
                {"name": key.fqdn, "vip": vip} for key, vip in sorted(st.routes.vips.items())
            ],
            "routes": st.routes.describe(),
            # remote clusters the local gateway said it cannot reach (avoided for now)
            "peers_unreachable": self.outbound.http.peers.down(time.monotonic()),
            # whether the gateway's peer-health feed is connected (sidecar.peer_watch)
            "peer_health_feed": self.outbound.http.peers.feed,
            "listeners": {
                "inbound": _addr(self.inbound.address) if self._started else None,
                "outbound": _addr(self.outbound.address) if self._started else None,
                "dns": _addr(self.dns.address) if self._started and self.dns else None,
            },
            "connections": {
                "outbound_active": self.outbound.active,
                "outbound_total": self.outbound.total,
                "outbound_failed": self.outbound.failed,
                "tls_sessions": self.outbound.sessions.status(),
                "multiplexed": self.outbound.pool.status(),
                "inbound_active": self.inbound.active,
                "inbound_total": self.inbound.total,
                "inbound_refused": self.inbound.refused,
                "inbound_handshakes": self.inbound.handshakes,
                "inbound_multiplexed": len(self.inbound.muxed),
            },
            "http": self.outbound.http.status(),
            "h2": self.outbound.h2.status(),
        }


def _addr(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"
