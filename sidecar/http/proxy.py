"""HTTP/1.1 in the source sidecar: each request of an app connection is routed on its own.

`HttpProxy.serve` drives one captured app connection whose service port speaks HTTP (declared,
or sniffed on a TCP port): it parses requests (`sidecar.http.codec`), and for each one takes
the sidecar's current config (a policy change applies to the next request; a request in flight
keeps the config it started with), matches the policy's routes, reads the body ahead for
replay (`sidecar.http.body`), injects faults (the abort answered with its status and
`x-fedgate-reason: fault abort`), maybe mirrors, and hands the request to
`sidecar.http.forward.Forwarder`. A malformed request gets 400/431/501/505 with the reason and
the connection is closed.

The per-service-port state that outlives snapshots (connection pool, outlier detection) lives
here, keyed by (service, port); `prune` drops what a new snapshot no longer has.
Telemetry (hop `source-sidecar`): with tracing on, one CLIENT span per request, child of the
app's `traceparent` (or a new trace), injected upstream in its place (on the connection a try
opened through a gateway, the remote ingress's span instead, so the destination hangs under
the hop before it); retries are span events. Each request ends in one access line (`http
request`, or `http request failed` with the reason) with the trace and span ids, and one
metrics record. What this module does not do: HTTP/2 and gRPC (`sidecar.http2.proxy`, which
shares the per-service runtime kept here; traced per connection), pipelining (requests of one
connection are served in turn).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import structlog

from mesh.naming import ServiceKey, SpiffeId
from mesh.tasks import TaskSet
from mesh.telemetry import OFF, Telemetry
from sidecar import sniff
from sidecar.errors import ProxyError
from sidecar.http.body import RequestBody, next_event
from sidecar.http.codec import (
    ConnectionClosed,
    HttpProtocolError,
    Reader,
    Request,
)
from sidecar.http.encode import (
    local_response,
)
from sidecar.http.exchange import MeshConnect, ServiceRuntime
from sidecar.http.flow import FlowConn
from sidecar.http.forward import Call, Forwarder
from sidecar.http.pool import PoolKey, ServicePool, UpstreamPool
from sidecar.observe import Observation
from sidecar.pipe import Conn
from sidecar.routes import RouteTable, ServiceRoute
from sidecar.state import ProxyState
from sidecar.traffic.attempt import Answer, health_check
from sidecar.traffic.experiments import fault_action
from sidecar.traffic.match import RequestInfo, effective
from sidecar.traffic.outlier import OutlierDetector
from sidecar.traffic.peers import PeerHealth

_log = structlog.get_logger("fedgate.sidecar")
_ids = itertools.count(1)


class HttpProxy:
    def __init__(
        self,
        state: Callable[[], ProxyState],
        connect: MeshConnect,
        live: dict[Conn, SpiffeId],
        rng: random.Random,
        *,
        sniff_timeout: float = sniff.SNIFF_TIMEOUT,
        telemetry: Telemetry = OFF,
        cluster: str = "",
        peers: PeerHealth | None = None,
    ) -> None:
        self._state = state
        self.telemetry = telemetry
        self.cluster = cluster  # the source cluster, for telemetry
        self._connect = connect
        self._rng = rng
        self.sniff_timeout = sniff_timeout
        self.pool = UpstreamPool(live)
        self._runtimes: dict[tuple[ServiceKey, int], ServiceRuntime] = {}
        self._tasks = TaskSet("sidecar-http")
        self._sweeper: asyncio.Task[None] | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        self.peers = peers or PeerHealth()  # remote clusters the local gateway cannot reach
        self.forwarder = Forwarder(connect, self.pool, rng, self.stats, self.peers)

    # -- lifecycle and config ---------------------------------------------------------------

    async def aclose(self) -> None:
        await self._tasks.aclose()
        await self.forwarder.aclose()
        await self.pool.close_all(rt.pool for rt in self._runtimes.values())

    def prune(self, routes: RouteTable) -> None:
        """After a config change: close idle connections and forget outlier state of hosts
        that left the catalog (connections in use finish their request)."""
        keep = pool_keeper(routes)
        hosts = {
            (route.service, route.port.port): frozenset(route.balancer.hosts())
            for route in routes.routes.values()
        }
        for rk, rt in self._runtimes.items():
            self.pool.sweep(rt.pool, keep=keep)
            if rt.outlier is not None:
                rt.outlier.forget(hosts.get(rk, frozenset()))

    def status(self) -> dict[str, object]:
        return {
            **dict(sorted(self.stats.items())),
            "connections_opened": self.pool.opened,
            "connections_reused": self.pool.reused,
            "services": {
                f"{k.fqdn}:{port}": {
                    "connections": rt.pool.budget.connections,
                    "idle": rt.pool.idle_count(),
                    "pending": rt.pool.budget.pending,
                    "requests": rt.pool.budget.requests,
                    "ejected": sorted(rt.outlier.ejected(_now())) if rt.outlier else [],
                }
                for (k, port), rt in sorted(self._runtimes.items(), key=lambda i: str(i[0]))
            },
        }

    def runtime(self, route: ServiceRoute) -> ServiceRuntime:
        key = (route.service, route.port.port)
        rt = self._runtimes.get(key)
        if rt is None:
            rt = self._runtimes[key] = ServiceRuntime(ServicePool())
        policy = route.policy
        rt.pool.budget.configure(policy.connection_pool if policy else None)
        od = policy.outlier_detection if policy else None
        if od is None:
            rt.outlier = None
        elif rt.outlier is None:
            rt.outlier = OutlierDetector(od, _now())
        else:
            rt.outlier.configure(od)
        return rt

    # -- per-connection (TCP) traffic shares the limits and outlier state -----------------

    def health(self, route: ServiceRoute) -> Callable[[str], bool]:
        """Whether a host of `route` is in rotation (not ejected by outlier detection)."""
        return health_check(self.runtime(route).outlier, _now(), self.peers)

    def tcp_admit(self, route: ServiceRoute) -> None:
        """Count a TCP connection against `maxConnections`; ProxyError if over it."""
        budget = self.runtime(route).pool.budget
        if not budget.may_open():
            self.stats["tcp_refused"] += 1
            cap = budget.limits.max_connections
            raise ProxyError("max connections", f"{budget.connections} open, limit {cap}")
        budget.opened()

    def tcp_release(self, route: ServiceRoute) -> None:
        rt = self._runtimes.get((route.service, route.port.port))
        if rt is not None:
            rt.pool.budget.closed()

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = self._tasks.spawn(self._sweep_forever(), "pool-sweeper")

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.pool.idle_timeout / 2)
            for rt in list(self._runtimes.values()):
                self.pool.sweep(rt.pool)

    # -- protocol choice --------------------------------------------------------------------

    async def wants(self, app: FlowConn, route: ServiceRoute) -> str:
        """How to serve this connection (`sidecar.sniff`): by the port's declared protocol,
        else by its first bytes, waiting `sniff_timeout` for them (then: per connection).
        The bytes stay buffered for whichever path serves the connection."""
        mode = sniff.declared(route.port.protocol, self.sniff_timeout > 0)
        if mode is not None:
            return mode
        app.resume_reading()
        try:
            async with asyncio.timeout(self.sniff_timeout):
                found = await app.read_frame(sniff.first_bytes, "first bytes")
        except (TimeoutError, ProxyError):
            return sniff.OPAQUE
        if found:
            self.stats["sniffed_http" if found == sniff.HTTP1 else "sniffed_h2"] += 1
        return found

    # -- one app connection -----------------------------------------------------------------

    async def serve(self, app: FlowConn, dst: tuple[str, int], log: Any) -> None:
        """Serve requests on `app` (captured to `dst`) until it or we end the connection."""
        self._ensure_sweeper()
        app.resume_reading()
        reader = Reader("request")
        try:
            while True:
                try:
                    event = await next_event(app, reader)
                except HttpProtocolError as e:
                    self.stats["bad_requests"] += 1
                    log.warning("http request refused", reason="malformed request", detail=e.detail)
                    app.write(local_response(e.status, "malformed request", e.detail, close=True))
                    break
                if isinstance(event, ConnectionClosed):
                    break
                assert isinstance(event, Request), event
                rlog = log.bind(req=f"r{next(_ids)}", method=event.method, path=event.target)
                if not await self._exchange(app, reader, event, dst, rlog):
                    break
                reader.next_message()
        except ProxyError as e:  # the app's connection failed
            log.info("http connection ended", reason=e.reason, detail=e.detail)
            app.reset_if_open()
            return
        except HttpProtocolError as e:  # a malformed body, once its head was answered
            log.warning("http connection reset", reason="malformed request body", detail=e.detail)
            app.reset_if_open()
            return
        app.finish()

    async def _exchange(
        self, app: FlowConn, reader: Reader, req: Request, dst: tuple[str, int], log: Any
    ) -> bool:
        """One request and its response; whether the app connection may carry another."""
        obs = Observation.begin(
            self.telemetry, self.cluster, req.method, req.target, req.get("traceparent")
        )
        if obs is None:
            return await self._exchange_one(app, reader, req, dst, log, None)
        route = self._state().routes.lookup(*dst)
        service = route.service.fqdn if route is not None else f"{dst[0]}:{dst[1]}"
        try:
            return await self._exchange_one(app, reader, req, dst, log.bind(**obs.log_ids()), obs)
        finally:
            obs.end(service)

    async def _exchange_one(
        self,
        app: FlowConn,
        reader: Reader,
        req: Request,
        dst: tuple[str, int],
        log: Any,
        obs: Observation | None,
    ) -> bool:
        started = time.monotonic()
        self.stats["requests"] += 1
        record = obs.record if obs is not None else None
        state = self._state()
        route = state.routes.lookup(*dst)
        expect = req.get("expect")
        if (expect or "").lower() == "100-continue" and reader.framing.kind != "none":
            # Answer for the upstream (Envoy's default): the body is read ahead anyway.
            app.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        fwd = req  # as forwarded: without `Expect` (a copy only when there is one)
        if expect is not None:
            fwd = replace(
                req, headers=tuple((k, v) for k, v in req.headers if k.lower() != "expect")
            )
        body = RequestBody(app, reader)
        try:
            await body.prefetch()
        except HttpProtocolError as e:
            self.stats["bad_requests"] += 1
            log.warning("http request refused", reason="malformed request body", detail=e.detail)
            app.write(local_response(e.status, "malformed request body", e.detail, close=True))
            if record is not None:
                record.status, record.reason = e.status, "malformed request body"
            return False
        local = self.forwarder.local
        if route is None:
            detail = f"{dst} left the mesh"
            return await local(app, req, body, log, Answer(503, "no route", detail), record)
        if state.client_ctx is None:
            not_ready = Answer(503, "not ready", "no SVID yet")
            return await local(app, req, body, log, not_ready, record)
        if req.method == "CONNECT":
            detail = "CONNECT to a mesh service"
            return await local(app, req, body, log, Answer(501, "not supported", detail), record)
        info = RequestInfo.build(req.method, req.target, req.headers)
        eff = effective(route.policy, info)
        log = log.bind(service=str(route.service), **({"route": eff.route} if eff.route else {}))
        if record is not None:
            record.routed(eff.route, state.svid.spiffe_id if state.svid else None)
        span = obs.span if obs is not None else None
        runtime = self.runtime(route)
        call = Call(fwd, app, body, route=route, state=state, eff=eff, runtime=runtime, log=log)
        call.span, call.record = span, record
        action = fault_action(eff.fault, self._rng)
        if action.delay:
            self.stats["fault_delays"] += 1
            await asyncio.sleep(action.delay)
        if action.abort:
            self.stats["fault_aborts"] += 1
            detail = f"injected by the policy of {route.service}"
            aborted = Answer(action.abort, "fault abort", detail)
            return await local(app, req, body, log, aborted, record)
        attempts = self.forwarder.attempts(call)
        if attempts.mirror():
            self.forwarder.mirror(call, attempts)
        keep = await self.forwarder.forward(call, attempts)
        if record is not None:
            record.request_bytes = body.sent
        call.log.info(
            "http request",
            duration_ms=round((time.monotonic() - started) * 1000, 1),
            **({"fault_delay_s": action.delay} if action.delay else {}),
        )
        return keep


def pool_keeper(routes: RouteTable) -> Callable[[PoolKey], bool]:
    """Whether a pooled connection's key still leads somewhere under `routes` (a remote key
    is kept whatever subset it was opened for)."""
    keys = pool_keys(routes)
    return lambda key: replace(key, labels=()) in keys


def pool_keys(routes: RouteTable) -> set[PoolKey]:
    """Every upstream a pooled connection may lead to under `routes` (others are dropped)."""
    keys: set[PoolKey] = set()
    for route in routes.routes.values():
        for cluster, eps in route.endpoints.items():
            if cluster == route.local_cluster:
                keys.update(
                    PoolKey(route.service, route.port.port, cluster, e.address) for e in eps
                )
            else:
                keys.add(PoolKey(route.service, route.port.port, cluster, ""))
    return keys


def _now() -> float:
    """Outlier detection's clock (not the loop's: `status()` may run outside it)."""
    return time.monotonic()
