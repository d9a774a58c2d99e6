"""The east-west gateway of one cluster: tunnel listeners (ingress) for every enabled transport
(`tls` and `passthrough` on TCP, `quic` on UDP), the egress listener, and the dialers per
transport (a pool of connections per peer for `tls` and `quic`; one connection per call for
`passthrough`). The egress picks the transport each peer cluster publishes.

`Gateway` is wired by `fedgate/`: it is handed its SVID (`set_identity`) and each accepted
config snapshot (`apply`); it fetches neither itself. Identity and trust bundle are read at
each handshake, so rotation needs no restart: connections already up keep the credentials they
were authenticated with, new handshakes use the new ones.

Who may connect to the tunnel (`tls`, `quic`): a peer whose certificate chains to a root of its
*own* trust domain in the current bundle (SPIFFE federation, `ca.verify`) and whose identity is
exactly `spiffe://<td>/ns/fedgate-system/sa/gateway` for a cluster in the current snapshot. A
peer we dial must present the gateway identity of the cluster we meant to reach. `passthrough`
authenticates no peer (see `gateway.passthrough`); it is enabled only by giving it a port.

A little over the ~400-line aim: listeners, dialers, contexts and status of the three
transports are wired here, in one place, rather than spread over per-transport wrappers.
"""

from __future__ import annotations

import asyncio
import random
import ssl
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
from ca.errors import CAError, VerificationError
from ca.naming import dns_names_for
from ca.tls import client_context, server_context
from ca.verify import utcnow
from gateway import server as tunnel_server
from gateway import tls_server, tls_tunnel
from gateway.egress import Egress
from gateway.errors import GatewayError, TunnelError
from gateway.ingress import Ingress
from gateway.passthrough import PassthroughDialer, PassthroughServer, PassthroughSettings
from gateway.pool import PeerPool
from gateway.quic_mtls import PeerPolicy
from gateway.resolve import Resolver
from gateway.tls_server import TlsTunnelServer
from gateway.tls_tunnel import TlsTunnelSettings
from gateway.transport import LISTEN_BACKLOG, TRANSPORTS, PeerTarget, StreamDialer
from gateway.tunnel import TunnelConnection, TunnelSettings, connect
from mesh.model import EMPTY_SNAPSHOT, Snapshot
from mesh.naming import SpiffeId, gateway_identity
from mesh.telemetry import EGRESS, INGRESS, OFF, Telemetry

_log = structlog.get_logger("fedgate.gateway")


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Where a gateway listens and how it tunnels. Parsed once by `fedgate/`."""

    cluster: str
    trust_domain: str
    tunnel_host: str = "0.0.0.0"  # faces the other gateways (the WAN), every transport
    tunnel_port: int | None = 15443  # quic, UDP; None: no QUIC listener
    tls_port: int | None = None  # tls, TCP; None: no TLS listener
    passthrough_port: int | None = None  # passthrough, TCP; None: off (it authenticates no one)
    dial: tuple[str, ...] = TRANSPORTS  # transports the egress may use toward peers
    egress_host: str = "0.0.0.0"  # TCP, faces this cluster's sidecars
    egress_port: int = 15008
    inbound_port: int = 15006  # destination sidecars' inbound port
    max_datagram_size: int = 1350
    connect_timeout: float = 5.0  # ingress -> endpoint
    reuse_port: bool = False  # SO_REUSEPORT on the TCP listeners (several replicas per host)
    # Peer gateways published under a DNS name are looked up again this often (`gateway.resolve`).
    dns_refresh: float = 5.0
    tunnel: TunnelSettings = field(default_factory=TunnelSettings)
    tls: TlsTunnelSettings = field(default_factory=TlsTunnelSettings)
    passthrough: PassthroughSettings = field(default_factory=PassthroughSettings)

    def __post_init__(self) -> None:
        unknown = set(self.dial) - set(TRANSPORTS)
        if unknown:
            raise ValueError(f"unknown transports {sorted(unknown)}; known: {TRANSPORTS}")

    @property
    def tunnel_settings(self) -> TunnelSettings:
        return replace(self.tunnel, max_datagram_size=self.max_datagram_size)


@dataclass(frozen=True, slots=True)
class LinkStats:
    """This gateway's view of its tunnel to one peer over one transport (see `link_stats`).
    Probe counters are those of the connections up now (they restart with each connection);
    the others count for the gateway's lifetime."""

    peer: str
    transport: str
    connected: bool
    connections: int
    rtt: float | None  # seconds, the best of the connections' smoothed probe round trips
    open_streams: int
    streams: int  # calls (streams) opened toward the peer, for the gateway's lifetime
    probes: int
    probes_answered: int
    handshakes: int
    handshake_failures: int
    losses: int
    healthy_connections: int = 0  # usable: passing their probes, not retiring
    loss_ratio: float = 0.0  # probes lost among the recent ones, worst connection
    health: str = "unknown"  # healthy, unreachable or unknown (`gateway.pool`)


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
        telemetry: Telemetry = OFF,
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
        self._tls_server: TlsTunnelServer | None = None
        self._pt_server: PassthroughServer | None = None
        self._egress_server: asyncio.Server | None = None
        self._ctx_cache: dict[tuple[Any, ...], ssl.SSLContext] = {}
        self.pools: dict[str, PeerPool] = {
            "quic": PeerPool(
                self._dial, size=1, log=self.log, dial_wait=settings.tunnel.health.dial_wait
            ),
            "tls": PeerPool(
                self._dial_tls,
                size=settings.tls.connections_per_peer,
                log=self.log,
                dial_wait=settings.tls.health.dial_wait,
            ),
        }
        self.passthrough = PassthroughDialer(settings.passthrough, log=self.log)
        every: dict[str, StreamDialer] = {**self.pools, "passthrough": self.passthrough}
        self.dialers = {t: every[t] for t in settings.dial}
        self.ingress = Ingress(
            settings.cluster,
            lambda: self._snapshot,
            settings.inbound_port,
            settings.connect_timeout,
            rng=rng,
            log=self.log,
            telemetry=telemetry,
        )
        self.resolver = Resolver(refresh=settings.dns_refresh, log=self.log)
        self.egress = Egress(
            settings.cluster,
            lambda: self._snapshot,
            self.dialers,
            self._tunnel.reply_timeout,
            log=self.log,
            telemetry=telemetry,
            resolve=self.resolver.address,
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
        self._ctx_cache.clear()
        self.log.info("gateway identity installed", identity=svid.spiffe_id.uri)

    def apply(self, snapshot: Snapshot) -> None:
        """Route with `snapshot` and trust its bundle (plus the bootstrap anchors) from now on.
        A snapshot whose bundle does not parse is refused whole (GatewayError)."""
        try:
            bundle = TrustBundle.from_pem(snapshot.trust_bundle).merged(self._anchors)
            bundle = bundle.with_denied(snapshot.denied)  # identity issue: deny-list hook
        except CAError as e:
            raise GatewayError(f"snapshot {snapshot.version}: {e}") from e
        self._snapshot = snapshot
        if bundle != self._bundle:
            self._ctx_cache.clear()
        self._bundle = bundle
        for transport, dialer in self.dialers.items():
            # A cluster that left, or now publishes another transport, keeps no connection.
            dialer.forget_missing(
                {
                    c.name
                    for c in snapshot.clusters
                    if c.gateway and c.gateway.transport == transport
                }
            )
        self.log.info("snapshot applied", version=snapshot.version, roots=len(bundle))
        self.revalidate_peers()

    def revalidate_peers(self) -> int:
        """Close live tunnel connections whose peer no longer passes the current bundle and
        policy (a root removed, a cluster gone, a certificate expired). `apply` calls it;
        `fedgate/` may also call it periodically. Returns how many were closed."""
        conns: list[Any] = [c for pool in self.pools.values() for c in pool.connections()]
        if self._server is not None:
            conns += list(self._server.connections)
        if self._tls_server is not None:
            conns += list(self._tls_server.connections)
        return sum(conn.revalidate() is not None for conn in conns)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._identity is None:
            raise GatewayError("set_identity() before start()")
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            if s.tunnel_port is not None:
                self._server = await tunnel_server.serve(
                    s.tunnel_host,
                    s.tunnel_port,
                    self._tunnel,
                    self._server_configuration,
                    self._server_policy,
                    self.ingress.handle,
                    identify=self._cluster_of,
                    log=self.log.bind(hop=INGRESS),  # names the hop in handshake refusals
                )
            if s.tls_port is not None:
                self._tls_server = TlsTunnelServer(
                    s.tls,
                    self._server_tls_context,
                    self._server_policy,
                    self.ingress.handle,
                    identify=self._cluster_of,
                    log=self.log.bind(hop=INGRESS),  # names the hop in handshake refusals
                )
                await self._tls_server.start(s.tunnel_host, s.tls_port, reuse_port=s.reuse_port)
            if s.passthrough_port is not None:
                self._pt_server = PassthroughServer(
                    s.passthrough, self.ingress.handle, self.log.bind(hop=INGRESS)
                )
                await self._pt_server.start(
                    s.tunnel_host, s.passthrough_port, reuse_port=s.reuse_port
                )
            self._egress_server = await loop.create_server(
                self.egress.protocol,
                s.egress_host,
                s.egress_port,
                reuse_port=s.reuse_port or None,
                backlog=LISTEN_BACKLOG,
            )
        except OSError as e:
            await self.aclose()
            raise GatewayError(f"cannot listen: {e}") from e
        self.log.info("gateway started", **self.status()["listeners"])

    async def drain(self, grace: float = 10.0) -> None:
        """Graceful stop: take no new call (listeners closed, new tunnel streams answered 503,
        `tls` peers told GOAWAY), let the calls in flight finish for up to `grace` seconds,
        then close everything."""
        self.egress.draining = self.ingress.draining = True
        if self._egress_server is not None:
            self._egress_server.close()
        if self._tls_server is not None:
            self._tls_server.drain()
        if self._pt_server is not None:
            self._pt_server.drain()
        for pool in self.pools.values():
            for conn in pool.connections():
                conn.retire()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # The active sets have no event to wait on; a bounded poll is simplest.
        while (self.egress.active or self.ingress.active) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        self.log.info(
            "gateway drained",
            unfinished=len(self.egress.active) + len(self.ingress.active),
        )
        await self.aclose()

    async def aclose(self) -> None:
        """Stop: listeners first, then calls and tunnel connections (peers are told, so they
        drop their side at once rather than at the idle timeout)."""
        if self._egress_server is not None:
            self._egress_server.close()
        await self.egress.aclose()
        await self.resolver.aclose()
        await self.ingress.aclose()
        for pool in self.pools.values():
            await pool.aclose()
        await self.passthrough.aclose()
        if self._server is not None:
            await self._server.aclose()
            self._server = None
        if self._tls_server is not None:
            await self._tls_server.aclose()
            self._tls_server = None
        if self._pt_server is not None:
            await self._pt_server.aclose()
            self._pt_server = None
        if self._egress_server is not None:
            await self._egress_server.wait_closed()
            self._egress_server = None

    @property
    def tunnel_address(self) -> tuple[str, int]:
        """The QUIC (UDP) tunnel listener."""
        if self._server is None:
            raise GatewayError("gateway has no QUIC listener")
        return self._server.address

    def listen_address(self, transport: str) -> tuple[str, int]:
        """Where this gateway accepts peers over `transport` (what its agent publishes)."""
        server: Any = {
            "quic": self._server,
            "tls": self._tls_server,
            "passthrough": self._pt_server,
        }[transport]
        if server is None:
            raise GatewayError(f"gateway has no {transport} listener")
        address: tuple[str, int] = server.address
        return address

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
        servers: list[tuple[str, Any]] = [("quic", self._server), ("tls", self._tls_server)]
        for transport, server in servers:
            if server is None:
                continue
            for conn in server.connections:
                inbound.append(
                    {
                        "transport": transport,
                        "peer": conn.peer_cluster or None,
                        "identity": conn.peer_identity.uri if conn.peer_identity else None,
                        "open_streams": len(conn.streams),
                        "streams_total": conn.counters["streams"],
                        # QUIC only: follows the peer's migrations.
                        "peer_address": getattr(conn, "peer_address", None) or None,
                        "max_datagram_size": getattr(conn, "max_datagram_size", None),
                    }
                )
        listeners = {
            "tunnel": _fmt(self._server.address) if self._server else None,
            "tls": _fmt(self._tls_server.address) if self._tls_server else None,
            "passthrough": _fmt(self._pt_server.address) if self._pt_server else None,
            "egress": _fmt(self.egress_address) if self._egress_server else None,
        }
        return {
            "cluster": self.settings.cluster,
            "identity": ident.svid.spiffe_id.uri if ident else None,
            "identity_not_after": ident.svid.not_after.isoformat() if ident else None,
            "snapshot_version": self._snapshot.version,
            "trust_domains": sorted(self._bundle.roots),
            "listeners": listeners,
            "outbound": {t: d.status() for t, d in self.dialers.items()},
            "inbound": inbound,
            "open_streams": {
                "egress": len(self.egress.active),
                "ingress": len(self.ingress.active),
            },
            "counters": {
                "egress": dict(self.egress.counters),
                "ingress": dict(self.ingress.counters),
                "tunnel_server": dict(self._server.counters) if self._server else {},
                "tls_server": dict(self._tls_server.counters) if self._tls_server else {},
                "passthrough_server": dict(self._pt_server.counters) if self._pt_server else {},
            },
        }

    def link_stats(self) -> list[LinkStats]:
        """One record per (peer cluster, multiplexed transport) this gateway dials: the
        source side of each gateway pair (its connections carry this cluster's calls to the
        peer), for the per-pair tunnel metrics. `passthrough` has no connection to report."""
        out: list[LinkStats] = []
        for transport, pool in sorted(self.pools.items()):
            for peer in sorted(pool.peers()):
                conns = pool.connections_to(peer)
                rtts = [c.rtt for c in conns if c.rtt is not None]
                counts = pool.peer_counters.get(peer, {})
                out.append(
                    LinkStats(
                        peer=peer,
                        transport=transport,
                        connected=any(c.usable for c in conns),
                        connections=len(conns),
                        rtt=min(rtts) if rtts else None,
                        open_streams=sum(len(c.streams) for c in conns),
                        streams=counts.get("streams", 0),
                        probes=sum(c.counters.get("probes", 0) for c in conns),
                        probes_answered=sum(c.counters.get("probes_answered", 0) for c in conns),
                        handshakes=counts.get("connects", 0),
                        handshake_failures=counts.get("connect_failures", 0),
                        losses=counts.get("losses", 0),
                        healthy_connections=sum(c.usable for c in conns),
                        loss_ratio=max((c.health.loss_ratio for c in conns), default=0.0),
                        health=pool.peer_health(peer),
                    )
                )
        return out

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

    def _server_tls_context(self) -> ssl.SSLContext:
        """Built once per (identity, bundle): OpenSSL checks chains against every root of
        the bundle; `tls_tunnel` then applies the trust-domain-scoped check and the policy."""
        ident = self._identity
        if ident is None:
            raise TunnelError("gateway has no identity")
        key = ("server", id(ident), id(self._bundle))
        ctx = self._ctx_cache.get(key)
        if ctx is None:
            ctx = server_context(ident.svid, self._bundle, alpn=(tls_tunnel.ALPN,))
            ctx.options |= ssl.OP_NO_TICKET  # no resumption: every peer is authenticated
            self._ctx_cache[key] = ctx
        return ctx

    def _client_tls_context(self, trust_domain: str) -> ssl.SSLContext:
        ident = self._identity
        if ident is None:
            raise TunnelError("gateway has no identity")
        key = ("client", id(ident), id(self._bundle), trust_domain)
        ctx = self._ctx_cache.get(key)
        if ctx is None:
            roots = self._bundle.for_domain(trust_domain)
            if not roots:
                raise TunnelError(f"no trust anchors for {trust_domain}")
            # Only the peer's own roots: another domain's root cannot vouch for its gateway.
            own = TrustBundle.from_pem({trust_domain: [cert_to_pem(c) for c in roots]})
            try:
                ctx = client_context(ident.svid, own, alpn=(tls_tunnel.ALPN,))
            except VerificationError as e:
                raise TunnelError(str(e)) from e
            self._ctx_cache[key] = ctx
        return ctx

    def _cluster_of(self, spiffe_id: SpiffeId) -> str:
        for c in self._snapshot.clusters:
            if c.name != self.settings.cluster and gateway_identity(c.trust_domain) == spiffe_id:
                return c.name
        return ""

    def _authorize_peer(self, spiffe_id: SpiffeId) -> str | None:
        if self._cluster_of(spiffe_id):
            return None
        return "not the gateway identity of a known peer cluster"

    def _client_policy(self, target: PeerTarget) -> PeerPolicy:
        expected = gateway_identity(target.trust_domain)

        def authorize(spiffe_id: SpiffeId) -> str | None:
            return None if spiffe_id == expected else f"expected {expected}"

        return PeerPolicy(bundle=lambda: self._bundle, authorize=authorize, now=self._now)

    async def _dial(self, target: PeerTarget) -> TunnelConnection:
        expected = gateway_identity(target.trust_domain)
        anchors = b"".join(cert_to_pem(c) for c in self._bundle.for_domain(target.trust_domain))
        if not anchors:
            raise TunnelError(f"no trust anchors for {target.trust_domain}")
        config = self._apply_identity(self._tunnel.configuration(is_client=True))
        config.server_name = dns_names_for(expected)[0]
        config.cadata = anchors  # only the peer's own domain: aioquic checks chain + DNS SAN
        return await connect(
            target.host,
            target.port,
            configuration=config,
            policy=self._client_policy(target),
            settings=self._tunnel,
            log=self.log.bind(peer=target.cluster, hop=EGRESS),
            identify=lambda _: target.cluster,
        )

    async def _dial_tls(self, target: PeerTarget) -> tls_tunnel.TlsTunnelConnection:
        expected = gateway_identity(target.trust_domain)
        return await tls_server.connect(
            target.host,
            target.port,
            context=self._client_tls_context(target.trust_domain),
            server_hostname=dns_names_for(expected)[0],
            policy=self._client_policy(target),
            settings=self.settings.tls,
            log=self.log.bind(peer=target.cluster, hop=EGRESS),
            identify=lambda _: target.cluster,
        )


def _fmt(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"
