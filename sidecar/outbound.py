"""Outbound proxy: captured app connections -> destination sidecars, inside mutual TLS.

For each connection redirected to the outbound port:

1. `SO_ORIGINAL_DST` says where the app was going. Not a mesh VIP: plain passthrough to that
   address (the sidecar's own sockets escape capture by GID). A VIP without that port: refused.
2. The route table decides: `Local` -> TCP to `<endpoint>:<inbound_port>`; `Remote` -> TCP to the
   local gateway's egress, `CONNECT` naming service, port and cluster, and a `200` required.
3. Over that connection: TLS 1.3 with the pod's SVID, the server's SPIFFE ID checked against the
   identities the decision allows, the stream header sent, a `200` stream reply required.
   Steps 2-3 are `sidecar.dial.MeshDialer`'s (on a pooled multiplexed connection when allowed).
4. Bytes are relayed both ways, with half-close, until both directions end (`sidecar.pipe`).

A service port declared `HTTP` (or a `TCP` port whose first bytes are an HTTP/1.x request) is
served by `sidecar.http.proxy.HttpProxy` instead, one declared `HTTP2`/`GRPC` (or whose first
bytes are the HTTP/2 preface) by `sidecar.http2.proxy.H2Proxy`: each request (stream) is
routed on its own by the request-attempt core (`sidecar.traffic.attempt`), with the policy's
retries, timeouts, limits, outlier detection, faults and mirroring, over pooled inner
connections made by the same `MeshDialer.upstream` as steps 2-3.

Every failure resets the app's connection and logs one line with the reason, pod, service,
clusters and connection id; success logs one access line when the connection ends.
Telemetry (hop `source-sidecar`): a per-connection (TCP) call gets one CLIENT span for the
connection's life, a new trace (TCP carries no context); its context goes in the CONNECT's
`traceparent`, and the inner stream header carries the span nearest the destination (the
ingress gateway's, from the CONNECT's `200`, else ours), so the destination sidecar's span
hangs under the hop before it. Every connection is one metrics record.
What this module does not do: HTTP and HTTP/2 (see above).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from mesh import telemetry as tm
from mesh.naming import SpiffeId
from mesh.tasks import TaskSet
from mesh.telemetry import OFF, Span, Telemetry
from sidecar.capture import original_dst
from sidecar.dial import MeshDialer, SetupError
from sidecar.errors import CaptureError, ProxyError
from sidecar.http.exchange import Dialed
from sidecar.http.flow import FlowConn, open_flow_conn
from sidecar.http.proxy import H2, HTTP1, SNIFF_TIMEOUT, HttpProxy
from sidecar.http2.proxy import H2Proxy
from sidecar.peer_watch import watch_peer_health
from sidecar.pipe import Conn, open_conn, relay
from sidecar.resume import SessionCache
from sidecar.routes import Decision, Local, Remote, ServiceRoute
from sidecar.settings import SidecarSettings
from sidecar.smux_pool import SmuxPool
from sidecar.state import ProxyState
from sidecar.tcp_tries import dial_tries
from sidecar.traffic.peers import PeerHealth

_log = structlog.get_logger("fedgate.sidecar")
_ids = itertools.count(1)

OriginalDst = Callable[[Any], tuple[str, int]]
# asyncio's default (100) overflows when an app opens a few hundred connections at once (curl
# --parallel, connection-per-request clients): the kernel then resets some of them.
BACKLOG = 1024


class Outbound:
    """The outbound listener and its connection handlers."""

    def __init__(
        self,
        settings: SidecarSettings,
        state: Callable[[], ProxyState],
        rng: random.Random | None = None,
        original_dst_of: OriginalDst = original_dst,
        *,
        sniff_timeout: float = SNIFF_TIMEOUT,
        telemetry: Telemetry = OFF,
    ) -> None:
        self._settings = settings
        self.telemetry = telemetry
        self._state = state
        self._rng = rng or random.Random()
        self._original_dst_of = original_dst_of
        self._tasks = TaskSet("sidecar-outbound")
        self._server: asyncio.Server | None = None
        self.active = 0
        self.total = 0
        self.failed = 0
        self.live: dict[Conn, SpiffeId] = {}  # mesh upstreams by server identity (revocation)
        self.sessions = SessionCache()  # TLS tickets per destination (sidecar.resume)
        # Multiplexed mTLS connections per destination (sidecar.smux), when settings allow.
        self.pool = SmuxPool(settings.mux_connections, settings.mux_max_age)
        peers = PeerHealth()  # remote clusters the local gateway cannot reach
        self.dialer = MeshDialer(settings, self.sessions, self.pool, peers)
        connect = functools.partial(self.dialer.upstream, opener=open_flow_conn)
        self.http = HttpProxy(
            state,
            connect,
            self.live,
            self._rng,
            sniff_timeout=sniff_timeout,
            telemetry=telemetry,
            cluster=settings.cluster,
            peers=peers,
        )
        self.h2 = H2Proxy(self.http, state, connect, self.live, self._rng)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self._settings
        self._server = await loop.create_server(
            lambda: FlowConn("app", self._accepted),
            s.outbound_host,
            s.outbound_port,
            backlog=BACKLOG,
        )
        # The local gateway's view of its peers, pushed (sidecar.peer_watch).
        self._tasks.spawn(
            watch_peer_health(lambda: self._state().routes.egress, self.http.peers), "peer-health"
        )

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "not started"
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        self.pool.close_all("sidecar stopping")
        await self._tasks.aclose()
        await self.http.aclose()
        await self.h2.aclose()
        if self._server is not None:
            await self._server.wait_closed()

    def _accepted(self, app: Conn) -> None:
        app.pause_reading()  # nothing is read from the app until the upstream is ready
        try:
            dst = self._original_dst_of(app.socket())
        except CaptureError as e:
            self._refuse_early(app, "no original destination", str(e))
            return
        local = app.transport.get_extra_info("sockname")
        if local is not None and (str(local[0]), int(local[1])) == dst:
            # Not redirected: someone dialled the outbound port itself. Passing it through
            # would connect to ourselves, again and again (each hop escapes capture by GID).
            self._refuse_early(app, "loop", f"{dst[0]}:{dst[1]} is the outbound port itself")
            return
        self._tasks.spawn(self.handle(app, dst), f"conn-{dst[0]}:{dst[1]}")

    def _refuse_early(self, app: Conn, reason: str, detail: str) -> None:
        self.failed += 1
        s = self._settings
        _log.warning(
            "outbound failed",
            hop=tm.SOURCE,
            reason=reason,
            detail=detail,
            pod=s.pod,
            cluster=s.cluster,
        )
        app.reset()

    async def handle(self, app: Conn, dst: tuple[str, int]) -> None:
        """Proxy one accepted app connection whose original destination was `dst`."""
        s = self._settings
        state = self._state()
        log = _log.bind(
            pod=s.pod,
            cluster=s.cluster,
            hop=tm.SOURCE,
            conn=f"{s.pod}/o{next(_ids)}",
            dst=f"{dst[0]}:{dst[1]}",
        )
        self.total += 1
        self.active += 1
        started = time.monotonic()
        upstream: Conn | None = None
        where: _Where | None = None  # where the connection goes, for the one log line
        dialed: Dialed | None = None
        admitted: ServiceRoute | None = None
        route = state.routes.lookup(*dst)
        span: Span | None = None
        code, outcome = "error", "cancelled"
        tcp = False  # served per connection (not HTTP): one span and record for it
        try:
            if route is not None and isinstance(app, FlowConn):
                mode = await self.http.wants(app, route)
                if mode == HTTP1:
                    slog = log.bind(service=str(route.service), mode="http")
                    await self.http.serve(app, dst, slog)
                    return
                if mode == H2:
                    await self.h2.serve(app, dst, log.bind(service=str(route.service), mode="h2"))
                    return
            tcp = True
            tel = self.telemetry
            if route is not None and tel.tracing:
                span = tel.start_span(
                    f"outbound {route.service}",
                    tm.SOURCE,
                    None,
                    {
                        tm.SOURCE_CLUSTER: s.cluster,
                        tm.SERVICE: route.service.fqdn,
                        tm.PROTOCOL: "tcp",
                        "server.port": route.port.port,
                    },
                    server=False,
                )
                log = log.bind(**tm.log_ids(span))
            traceparent = span.context.format() if span is not None else ""
            tried: list[_Where] = []  # where each try went (the last: the connection's)
            try:
                if route is not None:
                    # maxConnections holds for per-connection traffic too (Istio's tcp pool).
                    self.http.tcp_admit(route)
                    admitted = route
                try:
                    upstream, dialed = await self._upstream(
                        dst, state, route, traceparent, tried, log
                    )
                finally:
                    where = tried[-1] if tried else None
            except ProxyError as e:
                self.failed += 1
                code, outcome = "error", e.reason
                fields = _Where.fields_of(where, route)
                if len(tried) > 1:
                    fields["tries"] = len(tried)
                if isinstance(e, SetupError):
                    fields.update(e.learned())
                log.warning("outbound failed", reason=e.reason, detail=e.detail, **fields)
                return
            facts = {**_Where.fields_of(where, route), **_dialed_fields(dialed)}
            if dialed is not None:
                self.live[upstream] = dialed.peer
            error = await relay(app, upstream)
            code, outcome = ("error", error.reason) if error else ("ok", "")
            log.info(
                "outbound closed",
                bytes_sent=app.relayed,
                bytes_received=upstream.relayed,
                duration_s=round(time.monotonic() - started, 3),
                **facts,
                **({"reason": error.reason, "detail": error.detail} if error else {}),
            )
        finally:
            if tcp and route is not None and (span is not None or self.telemetry.metrics):
                peer = dialed.peer if dialed is not None else None
                own = state.svid.spiffe_id if state.svid is not None else None
                workloads = (tm.workload(own), tm.workload(peer))
                self._observe(span, where, route, code, outcome, started, app, upstream, workloads)
            self.active -= 1
            if admitted is not None:
                self.http.tcp_release(admitted)
            if upstream is not None:
                self.live.pop(upstream, None)
            # After a failure the app gets a RST; after cancellation both sides do.
            app.reset_if_open()
            if upstream is not None:
                upstream.reset_if_open()

    def _observe(
        self,
        span: Span | None,
        where: _Where | None,
        route: ServiceRoute,
        code: str,
        outcome: str,
        started: float,
        app: Conn,
        upstream: Conn | None,
        workloads: tuple[str, str],
    ) -> None:
        """End a TCP connection's span and record it (tracing or metrics on); `workloads`:
        (this one, the destination's verified one)."""
        dst_cluster = where.dst_cluster if where is not None else ""
        if span is not None:
            span.set(tm.DESTINATION_CLUSTER, dst_cluster)
            if where is not None and where.endpoint:
                span.set(tm.ENDPOINT, where.endpoint)
            span.end(outcome)
        self.telemetry.record(
            tm.SOURCE,
            "tcp",
            self._settings.cluster,
            dst_cluster,
            route.service.fqdn,
            code,
            time.monotonic() - started,
            app.relayed,
            upstream.relayed if upstream is not None else 0,
            source_workload=workloads[0],
            destination_workload=workloads[1],
        )

    def _where(
        self, dst: tuple[str, int], state: ProxyState, route: ServiceRoute | None
    ) -> _Where | None:
        """Passthrough outside the mesh, else None (the tries decide); ProxyError if the
        connection cannot be served at all."""
        if route is None:
            if state.routes.is_vip(dst[0]):
                raise ProxyError("unknown port", f"mesh VIP {dst[0]} has no port {dst[1]}")
            return _Where(mode="passthrough")
        if state.client_ctx is None:
            raise ProxyError("not ready", "no SVID or trust bundle yet")
        return None

    async def _upstream(
        self,
        dst: tuple[str, int],
        state: ProxyState,
        route: ServiceRoute | None,
        traceparent: str,
        tried: list[_Where],
        log: Any,
    ) -> tuple[Conn, Dialed | None]:
        """The connection to relay the app's bytes into, ready for them (and, into the mesh,
        what setting it up learned). Each mesh try is appended to `tried`."""
        s = self._settings
        where = self._where(dst, state, route)
        if where is not None:
            tried.append(where)
            return await open_conn(dst[0], dst[1], "passthrough", s.connect_timeout), None
        assert route is not None
        decisions: list[Decision] = []
        try:
            dialed = await dial_tries(
                self.dialer,
                route,
                state,
                traceparent,
                rng=self._rng,
                outlier=self.http.runtime(route).outlier,
                multiplex=s.multiplex and state.mux_ctx is not None,
                tried=decisions,
                log=log,
                stats=self.http.stats,
            )
        finally:
            tried.extend(_Where.of(route, d, s.cluster) for d in decisions)
        return dialed.conn, dialed


@dataclass(frozen=True, slots=True)
class _Where:
    """Where a per-connection call goes (what its log line and span say)."""

    route: ServiceRoute | None = None
    decision: Decision | None = None
    mode: str = ""  # "passthrough" outside the mesh
    dst_cluster: str = ""
    endpoint: str = ""
    gateway: str = ""

    @classmethod
    def of(cls, route: ServiceRoute, decision: Decision, local_cluster: str) -> _Where:
        match decision:
            case Local(endpoint=ep):
                return cls(route, decision, dst_cluster=local_cluster, endpoint=ep.address)
            case Remote(cluster=cluster, egress=egress):
                gateway = f"{egress.host}:{egress.port}"
                return cls(route, decision, dst_cluster=cluster, gateway=gateway)
            case _:
                raise AssertionError(f"unknown route decision {decision!r}")

    @staticmethod
    def fields_of(where: _Where | None, route: ServiceRoute | None) -> dict[str, object]:
        """The access-log fields: what is known of the route and where it led."""
        out: dict[str, object] = {}
        if route is not None:
            out.update(service=str(route.service), port=route.port.port)
        if where is None:
            return out
        for name in ("mode", "dst_cluster", "endpoint", "gateway"):
            if value := getattr(where, name):
                out[name] = value
        return out


def _dialed_fields(dialed: Dialed | None) -> dict[str, object]:
    if dialed is None:
        return {}
    out: dict[str, object] = {"peer": dialed.peer.uri, "tls_resumed": dialed.tls_resumed}
    if dialed.smux:
        out["smux"] = dialed.smux
    return out
