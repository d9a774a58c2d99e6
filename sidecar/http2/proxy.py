"""HTTP/2 and gRPC in the source sidecar: each stream of an app connection routed on its own.

`H2Proxy.serve` runs an HTTP/2 server (h2c with prior knowledge: the app talks plaintext to its
sidecar) on a captured app connection whose port is declared `HTTP2` or `GRPC`, or whose first
bytes are the HTTP/2 client preface. Every stream is a request handled in a task of its own, as
`sidecar.http.proxy` handles an HTTP/1.1 request: the sidecar's current config, route matching
(`:path` is the path, so a gRPC method is matched by `/pkg.Service/Method`), fault delay and
abort, mirroring, then `sidecar.http2.forward.H2Forwarder` with the service port's shared
runtime (limits, outlier state). A client's RST_STREAM (a cancelled gRPC call) cancels that
stream's task, which resets the upstream stream.

Pooled upstream HTTP/2 connections (`sidecar.http2.pool`) are swept when idle and dropped when
their key leaves the config (`prune`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from mesh import telemetry as tm
from mesh.naming import SpiffeId
from mesh.tasks import TaskSet
from sidecar.errors import ProxyError
from sidecar.http.exchange import MeshConnect
from sidecar.http.flow import FlowConn
from sidecar.http.proxy import HttpProxy, pool_keeper
from sidecar.http2 import grpc
from sidecar.http2.body import StreamBody
from sidecar.http2.conn import H2Conn, serve_streams
from sidecar.http2.forward import H2Call, H2Forwarder
from sidecar.http2.messages import MessageError, Request, parse_request
from sidecar.http2.pool import H2Pool
from sidecar.http2.session import Headers
from sidecar.observe import GRPC, HTTP, PROTOCOL_VERSION, Observation
from sidecar.pipe import Conn
from sidecar.routes import RouteTable
from sidecar.state import ProxyState
from sidecar.traffic.attempt import Answer
from sidecar.traffic.experiments import fault_action
from sidecar.traffic.match import effective

_log = structlog.get_logger("fedgate.sidecar")
_ids = itertools.count(1)


class H2Proxy:
    def __init__(
        self,
        http: HttpProxy,
        state: Callable[[], ProxyState],
        connect: MeshConnect,
        live: dict[Conn, SpiffeId],
        rng: random.Random,
    ) -> None:
        self._http = http  # owns the per-service runtime (limits, outlier state)
        self._state = state
        self._rng = rng
        self.pool = H2Pool(live)
        self.stats: collections.Counter[str] = collections.Counter()
        self.forwarder = H2Forwarder(connect, self.pool, rng, self.stats, http.peers)
        self._tasks = TaskSet("sidecar-h2")
        self._sweeper: asyncio.Task[None] | None = None

    async def aclose(self) -> None:
        await self._tasks.aclose()
        await self.forwarder.aclose()
        await self.pool.aclose()

    def prune(self, routes: RouteTable) -> None:
        """After a config change: close idle connections whose key left the config."""
        self.pool.sweep(keep=pool_keeper(routes))

    def status(self) -> dict[str, object]:
        return {
            **dict(sorted(self.stats.items())),
            "connections_opened": self.pool.opened,
            "streams_opened": self.pool.streams,
        }

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = self._tasks.spawn(self._sweep_forever(), "h2-pool-sweeper")

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.pool.idle_timeout / 2)
            self.pool.sweep()

    # -- one app connection -----------------------------------------------------------------

    async def serve(self, app: FlowConn, dst: tuple[str, int], log: Any) -> None:
        """Serve the streams of `app` (captured to `dst`) until the connection ends."""
        self._ensure_sweeper()
        self.stats["connections"] += 1

        def handle(h2: H2Conn, sid: int, head: Headers) -> Coroutine[Any, Any, None]:
            return self._stream(h2, sid, head, dst, log.bind(req=f"s{next(_ids)}"))

        def cancelled() -> None:
            self.stats["client_resets"] += 1

        h2 = await serve_streams(app, handle, "sidecar-h2-streams", cancelled)
        if h2.error is not None:
            log.info("http2 connection ended", reason=h2.error.reason, detail=h2.error.detail)

    async def _stream(
        self, h2: H2Conn, sid: int, head: Headers, dst: tuple[str, int], log: Any
    ) -> None:
        started = time.monotonic()
        self.stats["requests"] += 1
        ok = False
        body = StreamBody(h2, sid, ended=head.end)
        try:
            ok = await self._exchange(h2, sid, head, body, dst, log, started)
        except ProxyError as e:  # the app's stream failed (reset, connection gone)
            log.info("http2 stream ended", reason=e.reason, detail=e.detail)
        finally:
            h2.release(sid, reset=not ok, early=ok and not body.complete)

    async def _exchange(
        self,
        h2: H2Conn,
        sid: int,
        head: Headers,
        body: StreamBody,
        dst: tuple[str, int],
        log: Any,
        started: float,
    ) -> bool:
        try:
            req = parse_request(head.headers)
        except MessageError as e:
            self.stats["bad_requests"] += 1
            ct = next((v for k, v in head.headers if k == "content-type"), None)
            grpc_call = grpc.is_grpc(ct)
            malformed = Answer(400, "malformed request", str(e))
            return await self.forwarder.local(h2, sid, grpc_call, log, malformed)
        log = log.bind(method=req.method, path=req.path, **({"grpc": True} if req.grpc else {}))
        obs = Observation.begin(
            self._http.telemetry,
            self._http.cluster,
            req.method,
            req.path,
            req.get("traceparent"),
            protocol=GRPC if req.grpc else HTTP,
            attrs={tm.PROTOCOL: GRPC if req.grpc else HTTP, PROTOCOL_VERSION: "2"},
        )
        if obs is None:
            return await self._exchange_one(h2, sid, req, body, dst, log, started, None)
        route = self._state().routes.lookup(*dst)
        service = route.service.fqdn if route is not None else f"{dst[0]}:{dst[1]}"
        try:
            log = log.bind(**obs.log_ids())
            return await self._exchange_one(h2, sid, req, body, dst, log, started, obs)
        finally:
            obs.record.request_bytes = body.size
            obs.end(service)

    async def _exchange_one(
        self,
        h2: H2Conn,
        sid: int,
        req: Request,
        body: StreamBody,
        dst: tuple[str, int],
        log: Any,
        started: float,
        obs: Observation | None,
    ) -> bool:
        fwd = self.forwarder
        record = obs.record if obs is not None else None
        state = self._state()
        route = state.routes.lookup(*dst)
        if route is None:
            detail = f"{dst} left the mesh"
            return await fwd.local(h2, sid, req.grpc, log, Answer(503, "no route", detail), record)
        if state.client_ctx is None:
            not_ready = Answer(503, "not ready", "no SVID yet")
            return await fwd.local(h2, sid, req.grpc, log, not_ready, record)
        eff = effective(route.policy, req.info())
        log = log.bind(service=str(route.service), **({"route": eff.route} if eff.route else {}))
        if record is not None:
            record.routed(eff.route, state.svid.spiffe_id if state.svid else None)
        runtime = self._http.runtime(route)
        span = obs.span if obs is not None else None
        call = H2Call(
            req, h2, sid, body, route=route, state=state, eff=eff, runtime=runtime, log=log
        )
        call.span, call.record = span, record
        action = fault_action(eff.fault, self._rng)
        if action.delay:
            self.stats["fault_delays"] += 1
            await asyncio.sleep(action.delay)
        if action.abort:
            self.stats["fault_aborts"] += 1
            detail = f"injected by the policy of {route.service}"
            aborted = Answer(action.abort, "fault abort", detail)
            return await fwd.local(h2, sid, req.grpc, log, aborted, record)
        attempts = fwd.attempts(call)
        if attempts.mirror():
            fwd.mirror(call, attempts)
        ok = await fwd.forward(call, attempts)
        call.log.info(
            "http request",
            protocol="h2",
            duration_ms=round((time.monotonic() - started) * 1000, 1),
            **({"fault_delay_s": action.delay} if action.delay else {}),
        )
        return ok
