"""The east-west gateway of one cluster: tunnel listener (ingress), egress listener, peer pool.

`Gateway` is wired by `fedgate/`: it is handed its SVID (`set_identity`) and each accepted
config snapshot (`apply`); it fetches neither itself. Identity and trust bundle are read at
each handshake, so rotation needs no restart: connections already up keep the credentials they
were authenticated with, new handshakes use the new ones.

Who may connect to the tunnel: a peer whose certificate chains to a root of its *own* trust
domain in the current bundle (SPIFFE federation, `ca.verify`) and whose identity is exactly
`spiffe://<td>/ns/fedgate-system/sa/gateway` for a cluster in the current snapshot. A peer we
dial must present the gateway identity (and DNS SAN) of the cluster we meant to reach.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca.authority import Svid, cert_to_pem
from ca.bundle import EMPTY_BUNDLE, TrustBundle
from ca.errors import CAError
from ca.service import dns_names_for
from ca.verify import utcnow
from gateway import server as tunnel_server
from gateway.egress import Egress
from gateway.errors import GatewayError, TunnelError
from gateway.ingress import Ingress
from gateway.pool import PeerPool, PeerTarget
from gateway.quic_mtls import PeerPolicy
from gateway.tunnel import TunnelConnection, TunnelSettings, connect
from mesh.model import EMPTY_SNAPSHOT, Snapshot
from mesh.naming import SpiffeId, gateway_identity

_log = structlog.get_logger("fedgate.gateway")


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Where a gateway listens and how it tunnels. Parsed once by `fedgate/`."""

    cluster: str
    trust_domain: str
    tunnel_host: str = "0.0.0.0"  # UDP, faces the other gateways (the WAN)
    tunnel_port: int = 15443
    egress_host: str = "0.0.0.0"  # TCP, faces this cluster's sidecars
    egress_port: int = 15008
    inbound_port: int = 15006  # destination sidecars' inbound port
    max_datagram_size: int = 1350
    connect_timeout: float = 5.0  # ingress -> endpoint
    tunnel: TunnelSettings = field(default_factory=TunnelSettings)

    @property
    def tunnel_settings(self) -> TunnelSettings:
        return replace(self.tunnel, max_datagram_size=self.max_datagram_size)


@dataclass(frozen=True, slots=True)
class _Identity:
    svid: Svid
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key: ec.EllipticCurvePrivateKey


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        anchors: TrustBundle = EMPTY_BUNDLE,
        *,
        rng: random.Random | None = None,
        now: Callable[[], Any] = utcnow,
    ) -> None:
        self.settings = settings
        self._anchors = anchors
        self._bundle = anchors
        self._snapshot = EMPTY_SNAPSHOT
        self._identity: _Identity | None = None
        self._now = now
        self._tunnel = settings.tunnel_settings
        self.log = _log.bind(cluster=settings.cluster)
        self._server: tunnel_server.TunnelServer | None = None
        self._egress_server: asyncio.Server | None = None
        self.pool = PeerPool(self._dial, log=self.log)
        self.ingress = Ingress(
            settings.cluster,
            lambda: self._snapshot,
            settings.inbound_port,
            settings.connect_timeout,
            rng=rng,
            log=self.log,
        )
        self.egress = Egress(
            settings.cluster,
            lambda: self._snapshot,
            self.pool,
            self._tunnel.reply_timeout,
            log=self.log,
        )
        self._server_policy = PeerPolicy(
            bundle=lambda: self._bundle, authorize=self._authorize_peer, now=now
        )

    # --- inputs from fedgate/ ---------------------------------------------------------------

    def set_identity(self, svid: Svid) -> None:
        """Install (or rotate) this gateway's SVID; new handshakes use it."""
        expected = gateway_identity(self.settings.trust_domain)
        if svid.spiffe_id != expected:
            raise GatewayError(f"gateway SVID is {svid.spiffe_id}, expected {expected}")
        try:
            certs = x509.load_pem_x509_certificates(svid.cert_pem)
            key = serialization.load_pem_private_key(svid.key_pem, password=None)
        except ValueError as e:
            raise GatewayError(f"gateway SVID does not parse: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise GatewayError("gateway SVID key must be ECDSA")
        self._identity = _Identity(svid, certs[0], tuple(certs[1:]), key)
        self.log.info("gateway identity installed", identity=svid.spiffe_id.uri)

    def apply(self, snapshot: Snapshot) -> None:
        """Route with `snapshot` and trust its bundle (plus the bootstrap anchors) from now on.
        A snapshot whose bundle does not parse is refused whole (GatewayError)."""
        try:
            bundle = TrustBundle.from_pem(snapshot.trust_bundle).merged(self._anchors)
        except CAError as e:
            raise GatewayError(f"snapshot {snapshot.version}: {e}") from e
        self._snapshot = snapshot
        self._bundle = bundle
        self.pool.forget_missing({c.name for c in snapshot.clusters})
        self.log.info("snapshot applied", version=snapshot.version, roots=len(bundle))
        self.revalidate_peers()

    def revalidate_peers(self) -> int:
        """Close live tunnel connections whose peer no longer passes the current bundle and
        policy (a root removed, a cluster gone, a certificate expired). `apply` calls it;
        `fedgate/` may also call it periodically. Returns how many were closed."""
        conns = self.pool.connections()
        if self._server is not None:
            conns += list(self._server.connections)
        return sum(conn.revalidate() is not None for conn in conns)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._identity is None:
            raise GatewayError("set_identity() before start()")
        s = self.settings
        try:
            self._server = await tunnel_server.serve(
                s.tunnel_host,
                s.tunnel_port,
                self._tunnel,
                self._server_configuration,
                self._server_policy,
                self.ingress.handle,
                identify=self._cluster_of,
                log=self.log,
            )
            loop = asyncio.get_running_loop()
            self._egress_server = await loop.create_server(
                self.egress.protocol, s.egress_host, s.egress_port
            )
        except OSError as e:
            await self.aclose()
            raise GatewayError(f"cannot listen: {e}") from e
        self.log.info("gateway started", tunnel=self.tunnel_address, egress=self.egress_address)

    async def aclose(self) -> None:
        """Graceful stop: listeners first, then calls and tunnel connections (CONNECTION_CLOSE
        is sent, so peers drop their side at once rather than at the idle timeout)."""
        if self._egress_server is not None:
            self._egress_server.close()
        await self.egress.aclose()
        await self.ingress.aclose()
        await self.pool.aclose()
        if self._server is not None:
            await self._server.aclose()
            self._server = None
        if self._egress_server is not None:
            await self._egress_server.wait_closed()
            self._egress_server = None

    @property
    def tunnel_address(self) -> tuple[str, int]:
        if self._server is None:
            raise GatewayError("gateway not started")
        return self._server.address

    @property
    def egress_address(self) -> tuple[str, int]:
        if self._egress_server is None:
            raise GatewayError("gateway not started")
        host, port = self._egress_server.sockets[0].getsockname()[:2]
        return host, port

    def status(self) -> dict[str, Any]:
        """What this gateway runs, for the admin `/config` endpoint (JSON-serialisable)."""
        ident = self._identity
        inbound = []
        if self._server is not None:
            for conn in self._server.connections:
                inbound.append(
                    {
                        "peer": conn.peer_cluster or None,
                        "identity": conn.peer_identity.uri if conn.peer_identity else None,
                        "open_streams": len(conn.streams),
                        "streams_total": conn.counters["streams"],
                    }
                )
        return {
            "cluster": self.settings.cluster,
            "identity": ident.svid.spiffe_id.uri if ident else None,
            "identity_not_after": ident.svid.not_after.isoformat() if ident else None,
            "snapshot_version": self._snapshot.version,
            "trust_domains": sorted(self._bundle.roots),
            "listeners": {
                "tunnel": _fmt(self._server.address) if self._server else None,
                "egress": _fmt(self.egress_address) if self._egress_server else None,
            },
            "outbound": self.pool.status(),
            "inbound": inbound,
            "open_streams": {
                "egress": len(self.egress.active),
                "ingress": len(self.ingress.active),
            },
            "counters": {
                "egress": dict(self.egress.counters),
                "ingress": dict(self.ingress.counters),
                "tunnel_server": dict(self._server.counters) if self._server else {},
            },
        }

    # --- tunnel plumbing ---------------------------------------------------------------------

    def _apply_identity(self, config: QuicConfiguration) -> QuicConfiguration:
        ident = self._identity
        if ident is None:
            raise TunnelError("gateway has no identity")
        config.certificate = ident.certificate
        config.certificate_chain = list(ident.chain)
        config.private_key = ident.key
        return config

    def _server_configuration(self) -> QuicConfiguration:
        return self._apply_identity(self._tunnel.configuration(is_client=False))

    def _cluster_of(self, spiffe_id: SpiffeId) -> str:
        for c in self._snapshot.clusters:
            if c.name != self.settings.cluster and gateway_identity(c.trust_domain) == spiffe_id:
                return c.name
        return ""

    def _authorize_peer(self, spiffe_id: SpiffeId) -> str | None:
        if self._cluster_of(spiffe_id):
            return None
        return "not the gateway identity of a known peer cluster"

    async def _dial(self, target: PeerTarget) -> TunnelConnection:
        expected = gateway_identity(target.trust_domain)
        anchors = b"".join(cert_to_pem(c) for c in self._bundle.for_domain(target.trust_domain))
        if not anchors:
            raise TunnelError(f"no trust anchors for {target.trust_domain}")
        config = self._apply_identity(self._tunnel.configuration(is_client=True))
        config.server_name = dns_names_for(expected)[0]
        config.cadata = anchors  # only the peer's own domain: aioquic checks chain + DNS SAN

        def authorize(spiffe_id: SpiffeId) -> str | None:
            return None if spiffe_id == expected else f"expected {expected}"

        policy = PeerPolicy(bundle=lambda: self._bundle, authorize=authorize, now=self._now)
        return await connect(
            target.host,
            target.port,
            configuration=config,
            policy=policy,
            settings=self._tunnel,
            log=self.log.bind(peer=target.cluster),
            identify=lambda _: target.cluster,
        )


def _fmt(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"
