"""Outbound proxy: captured app connections -> destination sidecars, inside mutual TLS.

For each connection redirected to the outbound port, `Outbound` is the thin driver of three
steps, each its own unit:

1. Route (`sidecar.steer`, pure): `SO_ORIGINAL_DST` says where the app was going. Not a mesh
   VIP: plain passthrough to that address (the sidecar's own sockets escape capture by GID). A
   VIP without that port: refused. A mesh service port: its `ServiceRoute`.
2. Sniff (`sidecar.sniff`, pure; `HttpProxy.wants` waits for the bytes): a mesh port's declared
   protocol or first bytes choose HTTP/1.1, HTTP/2 or per-connection (TCP) proxying.
3. Dial (`sidecar.tcp_tries` over `sidecar.dial.MeshDialer`): the route table decides per try:
   `Local` -> TCP to `<endpoint>:<inbound_port>`; `Remote` -> TCP to the local gateway's egress,
   `CONNECT` naming service, port and cluster, and a `200` required. Over that connection: TLS
   1.3 with the pod's SVID, the server's SPIFFE ID checked against the identities the decision
   allows, the stream header sent, a `200` stream reply required (on a pooled multiplexed
   connection when allowed).

Then bytes are relayed both ways, with half-close, until both directions end (`sidecar.pipe`).
What is left here: admission (`maxConnections`, shared with HTTP), TCP telemetry and the log.

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
from sidecar.http.proxy import HttpProxy
from sidecar.http2.proxy import H2Proxy
from sidecar.peer_watch import watch_peer_health
from sidecar.pipe import Conn, open_conn, relay
from sidecar.resume import SessionCache
from sidecar.routes import Decision, ServiceRoute
from sidecar.settings import SidecarSettings
from sidecar.smux_pool import SmuxPool
from sidecar.sniff import H2, HTTP1, SNIFF_TIMEOUT
from sidecar.state import ProxyState
from sidecar.steer import PASSTHROUGH, Access, Leg, Mesh, Passthrough, Refused, Target, steer
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
        tried: list[Leg] = []  # where each try went (the last: the connection's)
        dialed: Dialed | None = None
        admitted: ServiceRoute | None = None
        target = steer(state.routes, dst)
        route = target.route if isinstance(target, Mesh) else None
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
            if route is not None and self.telemetry.tracing:
                span = self._start_span(route)
                log = log.bind(**tm.log_ids(span))
            traceparent = span.context.format() if span is not None else ""
            try:
                if route is not None:
                    # maxConnections holds for per-connection traffic too (Istio's tcp pool).
                    self.http.tcp_admit(route)
                    admitted = route
                upstream, dialed = await self._upstream(target, state, traceparent, tried, log)
            except ProxyError as e:
                self.failed += 1
                code, outcome = "error", e.reason
                fields = Access(route, _last(tried), tries=len(tried)).log_fields()
                if isinstance(e, SetupError):
                    fields.update(e.learned())
                log.warning("outbound failed", reason=e.reason, detail=e.detail, **fields)
                return
            if dialed is not None:
                self.live[upstream] = dialed.peer
            error = await relay(app, upstream)
            code, outcome = ("error", error.reason) if error else ("ok", "")
            log.info(
                "outbound closed",
                bytes_sent=app.relayed,
                bytes_received=upstream.relayed,
                duration_s=round(time.monotonic() - started, 3),
                **Access(route, _last(tried), dialed=dialed).log_fields(),
                **({"reason": error.reason, "detail": error.detail} if error else {}),
            )
        finally:
            if tcp and route is not None and (span is not None or self.telemetry.metrics):
                peer = dialed.peer if dialed is not None else None
                own = state.svid.spiffe_id if state.svid is not None else None
                workloads = (tm.workload(own), tm.workload(peer))
                where = _last(tried)
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

    def _start_span(self, route: ServiceRoute) -> Span:
        """A TCP connection's CLIENT span, a new trace (TCP carries no context)."""
        return self.telemetry.start_span(
            f"outbound {route.service}",
            tm.SOURCE,
            None,
            {
                tm.SOURCE_CLUSTER: self._settings.cluster,
                tm.SERVICE: route.service.fqdn,
                tm.PROTOCOL: "tcp",
                "server.port": route.port.port,
            },
            server=False,
        )

    def _observe(
        self,
        span: Span | None,
        where: Leg | None,
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

    async def _upstream(
        self,
        target: Target,
        state: ProxyState,
        traceparent: str,
        tried: list[Leg],
        log: Any,
    ) -> tuple[Conn, Dialed | None]:
        """The connection to relay the app's bytes into, ready for them (and, into the mesh,
        what setting it up learned). Each try is appended to `tried`; ProxyError if the
        connection cannot be served at all."""
        s = self._settings
        if isinstance(target, Refused):
            raise ProxyError(target.reason, target.detail)
        if isinstance(target, Passthrough):
            tried.append(PASSTHROUGH)
            return await open_conn(target.host, target.port, "passthrough", s.connect_timeout), None
        route = target.route
        if state.client_ctx is None:
            raise ProxyError("not ready", "no SVID or trust bundle yet")
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
            tried.extend(Leg.of(d, s.cluster) for d in decisions)
        return dialed.conn, dialed


def _last(tried: list[Leg]) -> Leg | None:
    return tried[-1] if tried else None
