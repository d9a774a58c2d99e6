"""Forwarding one HTTP request: its tries, retries, outlier bookkeeping, response and mirror.

`Forwarder.forward` tries upstream targets chosen by the route's balancer (subsets, locality
tiers, outlier health, avoiding hosts already tried), each try on a pooled inner mTLS
connection (`sidecar.http.pool`) under the connection-pool limits and the per-try deadline;
retries by the policy (`sidecar.traffic.retry`) with backoff; records each try's result for
outlier detection; and streams the final response back with backpressure, under the overall
timeout.

Every failure the sidecar answers itself carries `x-fedgate-reason` and is logged with the same
reason: 503 `max requests` / `pending overflow` (limits), `no route`, `upstream connect
failure`, `upstream reset`; 502 `bad upstream response`; 504 `upstream timeout`. A failure
after the response head went out resets the app's connection (a short body is worse than an
error). A 101 Switching Protocols (e.g. WebSocket) leaves HTTP: both connections are spliced.
Mirrors are fire-and-forget copies of replayable requests, bounded in number, responses
discarded, `-shadow` appended to their Host (Envoy's convention).

It is a little over 400 lines because a try, its outcome and the response that ends it share
one state (the pool lease, the request budget); splitting would spread that bookkeeping.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

from mesh.errors import NoRouteError
from mesh.naming import SpiffeId
from mesh.tasks import TaskSet
from mesh.telemetry import Span
from sidecar.errors import ProxyError
from sidecar.http.body import RequestBody, next_event
from sidecar.http.codec import (
    CHUNKED,
    UNTIL_CLOSE,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Framing,
    HttpProtocolError,
    Reader,
    Request,
    Response,
)
from sidecar.http.encode import (
    LAST_CHUNK,
    encode_chunk,
    encode_request,
    encode_response,
    local_response,
)
from sidecar.http.flow import FlowConn
from sidecar.http.pool import PoolKey, PoolRefusedError, ServicePool, Upstream, UpstreamPool
from sidecar.pipe import Conn, relay
from sidecar.routes import Decision, ServiceRoute
from sidecar.state import ProxyState
from sidecar.traffic.balance import Target
from sidecar.traffic.match import Effective
from sidecar.traffic.outlier import Ejected, OutlierDetector
from sidecar.traffic.peers import PeerHealth
from sidecar.traffic.retry import CONNECT_FAILURE, LOCAL, RESET, STATUS, TIMEOUT, Outcome, RetryPlan

DISCARD_LIMIT = 64 * 1024  # a retried response's body is read and dropped up to this, else closed
DISCARD_TIMEOUT = 2.0
MAX_MIRRORS = 64  # mirrored requests in flight per sidecar; beyond, a mirror is dropped (counted)
MIRROR_TIMEOUT = 10.0
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))

MeshConnect = Callable[[ServiceRoute, Decision, ProxyState, dict[str, object]], Awaitable[Conn]]


@dataclass(eq=False, slots=True)
class ServiceRuntime:
    """What outlives one snapshot for a service port: its pool and its outlier state."""

    pool: ServicePool
    outlier: OutlierDetector | None = None


@dataclass(eq=False, slots=True)
class Call:
    req: Request  # as forwarded (Expect handled)
    route: ServiceRoute
    state: ProxyState
    eff: Effective
    runtime: ServiceRuntime
    body: RequestBody
    log: Any
    head_sent: bool = False
    span: Span | None = None  # the request's span (tracing on)
    seen: Seen | None = None  # what telemetry reports at the end (tracing or metrics on)


@dataclass(eq=False, slots=True)
class Seen:
    """A request's outcome as telemetry reports it, filled in as the exchange goes."""

    status: int = 0
    reason: str = ""
    dst_cluster: str = ""
    endpoint: str = ""
    subset: str = ""
    retries: int = 0
    request_bytes: int = 0
    response_bytes: int = 0


@dataclass(frozen=True, slots=True)
class _Got:
    up: Upstream
    resp: Response
    reader: Reader


@dataclass(frozen=True, slots=True)
class _Failed:
    outcome: Outcome
    status: int
    reason: str
    detail: str


class ForwarderCore:
    """What the HTTP/1.1 and HTTP/2 forwarders share: the mesh connector, the random source,
    the proxy's counters, the gateway's verdicts on peers (routing health, with outlier
    detection), outlier bookkeeping and the admission of mirrored requests."""

    def __init__(
        self,
        connect: MeshConnect,
        rng: random.Random,
        stats: collections.Counter[str],
        peers: PeerHealth | None,
        name: str,
    ) -> None:
        self._connect = connect
        self._rng = rng
        self.stats = stats
        self.peers = peers
        self._tasks = TaskSet(name)
        self._mirrors = 0

    async def aclose(self) -> None:
        await self._tasks.aclose()

    def healthy(self, outlier: OutlierDetector | None) -> Callable[[str], bool]:
        """Which hosts a try may pick now."""
        return health_check(outlier, _now(), self.peers)

    def record(
        self, runtime: ServiceRuntime, route: ServiceRoute, log: Any, host: str, outcome: Outcome
    ) -> None:
        """A try's outcome, for outlier detection (local answers say nothing of the host)."""
        outlier = runtime.outlier
        if outlier is None or outcome.kind == LOCAL:
            return
        outlier.record(host, outcome.failed, _now(), len(route.balancer.hosts()))
        log_outlier_events(outlier, log, self.stats)

    def spawn_mirror(self, log: Any, send: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `send()` in the background unless MAX_MIRRORS are already in flight."""
        if self._mirrors >= MAX_MIRRORS:
            self.stats["mirrors_dropped"] += 1
            log.warning("http mirror dropped", reason="too many in flight", limit=MAX_MIRRORS)
            return
        self._mirrors += 1

        async def counted() -> None:
            try:
                await send()
            finally:
                self._mirrors -= 1

        self._tasks.spawn(counted(), "mirror")


class Forwarder(ForwarderCore):
    """Sends requests upstream for an `HttpProxy` (which owns the pool and the counters)."""

    def __init__(
        self,
        connect: MeshConnect,
        pool: UpstreamPool,
        rng: random.Random,
        stats: collections.Counter[str],
        peers: PeerHealth | None = None,
    ) -> None:
        super().__init__(connect, rng, stats, peers, "sidecar-http-mirror")
        self.pool = pool

    async def local(
        self,
        app: FlowConn,
        req: Request,
        body: RequestBody,
        log: Any,
        status: int,
        reason: str,
        detail: str,
        seen: Seen | None = None,
    ) -> bool:
        """Answer the app ourselves (reason in `x-fedgate-reason`); keep the connection only if
        the request was read whole."""
        self.stats["local_replies"] += 1
        if seen is not None:
            seen.status, seen.reason = status, reason
        keep = req.keep_alive and (body.complete or await body.discard(DISCARD_LIMIT))
        log.warning("http request failed", status=status, reason=reason, detail=detail)
        app.write(local_response(status, reason, detail, close=not keep))
        return keep

    # -- tries ------------------------------------------------------------------------------

    async def forward(self, app: FlowConn, call: Call) -> bool:
        loop = asyncio.get_running_loop()
        eff, route, rt = call.eff, call.route, call.runtime
        plan = RetryPlan(eff.retries, eff.timeout, loop.time(), self._rng)
        plan.replayable = call.body.complete
        tried: set[str] = set()
        while True:
            now = loop.time()
            deadline = plan.start_try(now)
            try:
                healthy = self.healthy(rt.outlier)
                target = route.target(eff, self._rng, healthy, frozenset(tried))
            except NoRouteError as e:
                body, log = call.body, call.log
                return await self.local(
                    app, call.req, body, log, 503, "no route", str(e), call.seen
                )
            tried.add(target.host)
            result = await self._try(call, target, deadline)
            outcome = result.outcome if isinstance(result, _Failed) else Outcome(STATUS, 0)
            if isinstance(result, _Got):
                outcome = Outcome(STATUS, result.resp.status)
            self._record(call, target, outcome)
            wait = plan.backoff(outcome, loop.time())
            if wait is None:
                call.log = call.log.bind(tries=plan.tries, dst_cluster=target.cluster)
                if target.endpoint is not None:
                    call.log = call.log.bind(endpoint=target.endpoint.address)
                if call.seen is not None:
                    call.seen.dst_cluster = target.cluster
                    call.seen.endpoint = _address(target)
                    call.seen.subset = target.subset
                    call.seen.retries = plan.tries - 1
                if isinstance(result, _Got):
                    return await self._respond(app, call, result, plan.deadline)
                self.stats["failed"] += 1
                body = call.body
                status, reason, detail = result.status, result.reason, result.detail
                return await self.local(
                    app, call.req, body, call.log, status, reason, detail, call.seen
                )
            self.stats["retries"] += 1
            if isinstance(result, _Got):
                detail = f"status {result.resp.status}"
                await self._discard(call, result)
            else:
                detail = f"{result.reason}: {result.detail}"
            if call.span is not None:
                call.span.event(
                    "retry", {"attempt": plan.tries, "host": target.host, "why": detail}
                )
            call.log.info(
                "http retry",
                try_=plan.tries,
                host=target.host,
                reason=result.reason if isinstance(result, _Failed) else "retryable status",
                detail=detail,
                backoff_s=wait,
            )
            await asyncio.sleep(wait)

    def _record(self, call: Call, target: Target, outcome: Outcome) -> None:
        self.record(call.runtime, call.route, call.log, target.host, outcome)

    async def _try(self, call: Call, target: Target, deadline: float | None) -> _Got | _Failed:
        """One try: a connection, the request, the response head. Never raises for upstream
        failures (they become `_Failed` with the outcome that retries and outlier detection
        judge); an app failure while streaming the request body raises ProxyError."""
        route, state, svc = call.route, call.state, call.runtime.pool
        decision = route.decision_for(target)
        key = PoolKey(
            route.service, route.port.port, target.cluster, _address(target), target.labels
        )
        refusal = svc.budget.start_request()
        if refusal is not None:
            return _Failed(Outcome(LOCAL), 503, refusal.reason, refusal.detail)
        facts: dict[str, object] = {}
        if call.span is not None:
            facts["traceparent"] = call.span.context.format()  # for the CONNECT

        async def opener() -> tuple[FlowConn, SpiffeId]:
            conn = await self._connect(route, decision, state, facts)
            assert isinstance(conn, FlowConn)
            return conn, SpiffeId.parse(str(facts["peer"]))

        span = call.span
        head = b"" if span is not None else encode_request(call.req, call.body.out_framing)
        phase = "connect"
        up: Upstream | None = None
        got_out = False
        try:
            async with asyncio.timeout_at(deadline):
                for fresh in (False, True):
                    phase = "connect"
                    up, reused = await self.pool.acquire(
                        svc, key, decision.identities.__contains__, state.svid, opener, fresh=fresh
                    )
                    phase = "request"
                    if span is not None:
                        # On the connection this try opened, the next span on the path is the
                        # remote ingress gateway's (`via`), else it is ours.
                        via = "" if reused else str(facts.get("via", ""))
                        tp = via or span.context.format()
                        head = encode_request(call.req, call.body.out_framing, tp)
                    try:
                        await call.body.send(up.conn, head)
                        phase = "response"
                        resp, reader = await self._response_head(up.conn, call.req)
                    except (ProxyError, HttpProtocolError):
                        self.pool.discard(svc, up)
                        up = None
                        # A pooled connection the server closed while idle: the request never
                        # reached it. Once, on a fresh connection, if that is safe to repeat.
                        stale = reused and call.body.complete and not call.body.streamed
                        if fresh or not stale or call.req.method not in IDEMPOTENT:
                            raise
                        self.stats["stale_connections"] += 1
                        continue
                    got = _Got(up, resp, reader)
                    up, got_out = None, True
                    return got  # the request stays counted until the response is done
        except PoolRefusedError as e:
            return _Failed(Outcome(LOCAL), 503, e.reason, e.detail)
        except TimeoutError:
            return _Failed(
                Outcome(TIMEOUT), 504, "upstream timeout", timeout_detail(call.eff, phase)
            )
        except HttpProtocolError as e:
            if phase == "request":
                raise  # only the app's streamed body is parsed while sending the request
            return _Failed(Outcome(RESET), 502, "bad upstream response", e.detail)
        except ProxyError as e:
            if phase == "connect":
                return _Failed(Outcome(CONNECT_FAILURE), 503, "upstream connect failure", str(e))
            if phase == "request" and call.body.streamed and _failed(call.body.app):
                raise  # the app went away mid-body: nothing to answer
            return _Failed(Outcome(RESET), 503, "upstream reset", f"{phase}: {e}")
        finally:
            if up is not None:
                self.pool.discard(svc, up)
            if not got_out:
                svc.budget.end_request()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _response_head(self, conn: FlowConn, req: Request) -> tuple[Response, Reader]:
        reader = Reader("response")
        reader.expect(req.method)
        while True:
            event = await next_event(conn, reader)
            match event:
                case Response(status=status) if status < 200:
                    if status == 101 and req.upgrade:
                        return event, reader
                    continue  # 100, 102, 103: interim, dropped (we answered 100 ourselves)
                case Response():
                    return event, reader
                case ConnectionClosed():
                    raise ProxyError("upstream closed", "the connection ended before a response")
                case _:
                    raise AssertionError(f"unexpected {event!r} before a response")

    async def _discard(self, call: Call, got: _Got) -> None:
        """Drop a response we will retry; keep its connection if that is cheap."""
        svc = call.runtime.pool
        try:
            async with asyncio.timeout(DISCARD_TIMEOUT):
                dropped = 0
                while not isinstance(
                    event := await next_event(got.up.conn, got.reader), EndOfMessage
                ):
                    if isinstance(event, Data):
                        dropped += len(event.data)
                        if dropped > DISCARD_LIMIT:
                            raise ProxyError("too large", "response body to discard")
        except (TimeoutError, ProxyError, HttpProtocolError):
            self.pool.discard(svc, got.up)
        else:
            self.pool.release(svc, got.up, _reusable(got))
        finally:
            svc.budget.end_request()

    async def _respond(self, app: FlowConn, call: Call, got: _Got, deadline: float | None) -> bool:
        """Stream the final response to the app; whether the app connection may continue."""
        svc, resp, reader, up = call.runtime.pool, got.resp, got.reader, got.up
        call.log = call.log.bind(status=resp.status)
        seen = call.seen
        if seen is not None:
            seen.status = resp.status
        try:
            if resp.status == 101:
                return await self._upgrade(app, call, got)
            framing = reader.framing
            version = call.req.version
            out: Framing = framing
            if framing.kind == "close" or (framing.kind == "chunked" and version == "1.0"):
                out = CHUNKED if version == "1.1" else UNTIL_CLOSE
            keep = call.req.keep_alive and out.kind != "close" and call.body.complete
            try:
                async with asyncio.timeout_at(deadline):
                    app.write(encode_response(resp, out, close=not keep))
                    call.head_sent = True
                    while True:
                        event = await next_event(up.conn, reader)
                        if isinstance(event, EndOfMessage):
                            break
                        assert isinstance(event, Data), event
                        if seen is not None:
                            seen.response_bytes += len(event.data)
                        app.write(encode_chunk(event.data) if out is CHUNKED else event.data)
                        await app.drain()
                    if out is CHUNKED:
                        app.write(LAST_CHUNK)
            except (TimeoutError, ProxyError, HttpProtocolError) as e:
                self.pool.discard(svc, up)
                why = "response timeout" if isinstance(e, TimeoutError) else "response failed"
                call.log.warning("http request failed", reason=why, detail=str(e) or why)
                if seen is not None:
                    seen.reason = why
                self.stats["failed"] += 1
                app.reset()  # the head went out: only a reset tells the app it is incomplete
                return False
            self.pool.release(svc, up, _reusable(got))
            return keep
        finally:
            svc.budget.end_request()

    async def _upgrade(self, app: FlowConn, call: Call, got: _Got) -> bool:
        """101 Switching Protocols: forward it, then splice both connections until they end."""
        svc, up = call.runtime.pool, got.up
        app.write(encode_response(got.resp, Framing("none")))
        rest = got.reader.take_buffer()
        if rest:
            app.write(rest)
        pending = call.body.reader.take_buffer()
        if pending:
            up.conn.write(pending)
        self.pool.detach(svc, up)
        call.log.info("http upgraded", upgrade=got.resp.get("upgrade") or "")
        error = await relay(app, up.conn)
        self.pool.forget(up)
        if error is not None:
            call.log.info("http upgraded connection ended", reason=error.reason)
        return False

    # -- mirroring --------------------------------------------------------------------------

    def mirror(self, call: Call) -> None:
        if not call.body.complete:
            self.stats["mirrors_skipped"] += 1  # the body streams: it cannot be sent twice
            return
        self.spawn_mirror(call.log, lambda: self._send_mirror(call))

    async def _send_mirror(self, call: Call) -> None:
        mirror = call.eff.mirror
        assert mirror is not None
        req = replace(call.req, headers=_shadow_host(call.req.headers))
        shadow = replace(call, req=req, log=call.log.bind(mirror=True), seen=None)
        loop = asyncio.get_running_loop()
        try:
            target = call.route.target(
                call.eff,
                self._rng,
                lambda h: True,
                subset=mirror.subset or None,
                cluster_ref=mirror.cluster,
            )
            result = await self._try(
                shadow, target, loop.time() + (call.eff.timeout or MIRROR_TIMEOUT)
            )
            if isinstance(result, _Got):
                self.stats["mirrored"] += 1
                shadow.log.info(
                    "http mirrored",
                    host=target.host,
                    dst_cluster=target.cluster,
                    status=result.resp.status,
                )
                await self._discard(shadow, result)
            else:
                self.stats["mirror_failures"] += 1
                shadow.log.info("http mirror failed", reason=result.reason, detail=result.detail)
        except NoRouteError as e:
            self.stats["mirror_failures"] += 1
            shadow.log.info("http mirror failed", reason="no route", detail=str(e))


def _now() -> float:
    """Outlier detection's clock (not the loop's: `status()` may run outside it)."""
    return time.monotonic()


def log_outlier_events(outlier: OutlierDetector, log: Any, stats: collections.Counter[str]) -> None:
    for event in outlier.events:
        if isinstance(event, Ejected):
            stats["ejections"] += 1
            log.warning(
                "outlier ejected",
                host=event.host,
                consecutive_failures=event.consecutive,
                for_s=round(event.until - _now(), 3),
            )
        else:
            log.info("outlier returned", host=event.host)
    outlier.events.clear()


def health_check(
    outlier: OutlierDetector | None, now: float, peers: PeerHealth | None = None
) -> Callable[[str], bool]:
    """A host is healthy unless outlier detection ejected it or (a remote cluster) the local
    gateway said it cannot reach that cluster (`sidecar.traffic.peers`)."""
    if outlier is None and peers is None:
        return lambda host: True
    return lambda host: (
        (outlier is None or not outlier.is_ejected(host, now))
        and (peers is None or peers.healthy(host, now))
    )


def _failed(conn: FlowConn) -> bool:
    return conn.error is not None or conn.closed.done()


def _address(target: Target) -> str:
    return target.endpoint.address if target.endpoint is not None else ""


def _reusable(got: _Got) -> bool:
    return got.resp.keep_alive and got.reader.framing.kind != "close" and got.reader.buffered == 0


def timeout_detail(eff: Effective, phase: str) -> str:
    """The reason text of a 504: which phase missed which deadline (both forwarders)."""
    r = eff.retries
    per_try = r.per_try_timeout if r is not None else None
    limits = [f"per-try timeout {per_try} s"] if per_try else []
    if eff.timeout:
        limits.append(f"timeout {eff.timeout} s")
    return f"{phase} not done within {' / '.join(limits) or 'the deadline'}"


def _shadow_host(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Envoy's convention: a mirrored request's authority gets `-shadow` appended."""
    out = []
    for k, v in headers:
        if k.lower() == "host":
            host, colon, port = v.rpartition(":") if v.count(":") == 1 else (v, "", "")
            v = f"{host}-shadow{colon}{port}"
        out.append((k, v))
    return tuple(out)
