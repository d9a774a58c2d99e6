"""Inbound proxy: mutual TLS from other sidecars -> the pod's application on loopback.

For each connection to the inbound port:

1. TLS 1.3 handshake with the pod's SVID; a client certificate is required. Then
   `ca.tls.peer_identity` applies the trust-domain-scoped SPIFFE check that OpenSSL cannot
   (a west root must not vouch for an east identity). A refusal is logged with a short reason:
   `no client certificate`, `foreign root`, `expired`, `trust-domain mismatch`, ...
2. The stream header (bounded) names service and port. Only a port the snapshot declares for a
   known service is served, so a mesh identity cannot reach arbitrary loopback ports (the
   admin endpoint, DNS). Unknown: stream reply 404 with the reason.
3. TCP to `<app_host>:<port>`; failure -> stream reply 503 with the OS reason. Else 200, and
   bytes are relayed both ways with half-close.

Each accepted stream is logged with the caller's verified SPIFFE ID: the destination sees the
real caller, even through gateways.

Telemetry (hop `destination-sidecar`, with tracing or metrics on): the relayed bytes are
watched (`sidecar.http.tap`); an HTTP/1.x connection gets a SERVER span, an access line
(`inbound request`) and a metrics record per request, the span a child of the request's
`traceparent`; any other connection gets them once, for the connection, the span a child of
the stream header's `traceparent`. The source cluster is the caller's trust domain's first
label (`mesh.naming.trust_domain_for`).

Authorization (the service's `AuthorizationPolicy`s from the snapshot, `mesh.authz`): a service
without policies admits every verified caller and its streams are spliced as before. On a TCP
port the stream is decided by caller and port when its header arrives, and a refused one gets
stream reply 403 naming the policy (the source sidecar logs it). On an HTTP, HTTP2 or GRPC port
every request is decided on its own (`sidecar.inbound_gate`), against the config current at that
request: a refusal is `403` with `x-fedgate-reason` (gRPC: `PERMISSION_DENIED`). Every refusal
is logged (`inbound request denied`) and counted by service and reason (`denials`). When a new
snapshot stops admitting the caller of an open TCP stream (or of a spliced HTTP one), `enforce`
resets it, as revocation does.

Over the 450-line aim: admission, the splice and per-stream authorization share each connection's
state; the HTTP gate is already its own module (`sidecar.inbound_gate`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from ca.bundle import TrustBundle
from ca.errors import DeniedError, VerificationError
from ca.tls import peer_identity
from mesh import telemetry as tm
from mesh import tracecontext
from mesh.authz import AUTHZ_REFUSAL, AuthzDecision, AuthzRequest, authorize
from mesh.codec import StreamHeader, StreamReply, encode_reply, header_from_json, split_frame
from mesh.errors import CodecError
from mesh.model import HTTP_PROTOCOLS
from mesh.naming import ServiceKey, SpiffeId
from mesh.tasks import TaskSet
from mesh.telemetry import OFF, Span, Telemetry
from sidecar import inbound_gate
from sidecar.errors import ProxyError
from sidecar.http.codec import Request
from sidecar.http.flow import FlowConn, open_flow_conn
from sidecar.http.tap import Exchange, HttpTap
from sidecar.pipe import Conn, open_conn, relay
from sidecar.routes import RouteTable
from sidecar.settings import SidecarSettings
from sidecar.smux import ALPN as SMUX_ALPN
from sidecar.smux import SmuxConnection, refusal
from sidecar.state import ProxyState

_log = structlog.get_logger("fedgate.sidecar")
_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class _Call:
    """What an accepted stream was admitted for (re-checked by `Inbound.enforce`)."""

    caller: SpiffeId
    service: ServiceKey
    port: int
    gated: bool  # decided per request (HTTP): a new config applies to its next request


def identity_failure(e: VerificationError) -> ProxyError:
    """Categorise `ca.verify`'s reasons. OpenSSL already chained the certificate to *some*
    root of the bundle, so a chain that reaches no root of its own domain is a mismatch."""
    text = str(e)
    if isinstance(e, DeniedError):
        return ProxyError("denied", text)
    if "expired" in text:
        return ProxyError("expired", text)
    if "not valid before" in text:
        return ProxyError("not yet valid", text)
    if "no root in the trust bundle" in text or "not signed by any root of its trust" in text:
        return ProxyError("trust-domain mismatch", text)
    if "no certificate" in text:
        return ProxyError("no client certificate", text)
    return ProxyError("identity rejected", text)


def close_denied(live: dict[Conn, SpiffeId], bundle: TrustBundle, side: str) -> int:
    """Reset each connection in `live` whose peer identity is denied (revocation of
    established connections; the relay then fails both halves)."""
    closed = 0
    for conn, peer in list(live.items()):
        entry = bundle.denial(peer)
        if entry is not None:
            _log.warning(f"{side} connection closed", reason="denied", peer=peer.uri, entry=entry)
            live.pop(conn, None)
            conn.reset()
            closed += 1
    return closed


class Inbound:
    """The inbound mTLS listener and its connection handlers."""

    def __init__(
        self,
        settings: SidecarSettings,
        state: Callable[[], ProxyState],
        telemetry: Telemetry = OFF,
    ) -> None:
        self._settings = settings
        self.telemetry = telemetry
        self._state = state
        self._tasks = TaskSet("sidecar-inbound")
        self._server: asyncio.Server | None = None
        self.active = 0
        self.total = 0
        self.refused = 0
        self.handshakes = 0  # TLS handshakes completed (a multiplexed caller needs few)
        self.live: dict[Conn, SpiffeId] = {}  # accepted callers, to close them once denied
        self.calls: dict[Conn, _Call] = {}  # the same, with what each was admitted for
        self.denials: collections.Counter[tuple[str, str]] = collections.Counter()
        self.muxed: dict[SmuxConnection, SpiffeId] = {}  # multiplexed callers (sidecar.smux)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self._settings
        self._server = await loop.create_server(
            lambda: FlowConn("caller", self._accepted), s.inbound_host, s.inbound_port
        )

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "not started"
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.muxed):
            conn.close("sidecar stopping")
        await self._tasks.aclose()
        if self._server is not None:
            await self._server.wait_closed()

    def close_denied(self, bundle: TrustBundle) -> int:
        """Reset accepted connections (and streams) whose caller `bundle` now denies, and close
        their multiplexed connections; how many streams and connections."""
        closed = close_denied(self.live, bundle, "inbound")
        for conn, peer in list(self.muxed.items()):
            entry = bundle.denial(peer)
            if entry is not None:
                conn.log.warning("smux connection closed", reason="denied", entry=entry)
                conn.close(f"peer denied: {entry}")
                closed += 1
        return closed

    def enforce(self, routes: RouteTable) -> int:
        """Reset the open streams whose caller `routes`' AuthorizationPolicies no longer admit
        (TCP, and HTTP spliced before its service had policies); how many."""
        closed = 0
        for conn, call in list(self.calls.items()):
            if call.gated:
                continue  # each request is decided with the config of its time
            policies = routes.policies(call.service)
            if not policies:
                continue
            decision = authorize(policies, AuthzRequest(call.caller.uri, call.port))
            http = routes.protocol(call.service, call.port) in HTTP_PROTOCOLS
            if decision.allowed and not http:
                continue
            reason = decision.reason if not decision.allowed else "now decided per request"
            _log.warning(
                "inbound connection closed",
                reason="authorization",
                detail=reason,
                caller=call.caller.uri,
                service=call.service.fqdn,
                port=call.port,
            )
            self.calls.pop(conn, None)
            self.live.pop(conn, None)
            conn.reset()
            closed += 1
        return closed

    def _denied(
        self, log: Any, call: _Call, decision: AuthzDecision, method: str, path: str
    ) -> None:
        """A refusal's access line and counts (the caller's answer is the driver's)."""
        self.denials[(call.service.fqdn, decision.reason)] += 1
        log.warning(
            "inbound request denied",
            status=403,
            reason=decision.reason,
            policy=decision.policy or None,
            **({"method": method, "path": path} if method else {}),
        )
        source = call.caller.trust_domain.partition(".")[0]
        protocol = "http" if method else "tcp"
        status = "403" if method else "denied"
        self.telemetry.record(
            tm.DESTINATION,
            protocol,
            source,
            self._settings.cluster,
            call.service.fqdn,
            status,
            0.0,
            0,
            0,
            route="",
            source_workload=tm.workload(call.caller),
            destination_workload=self._workload(),
        )

    def _workload(self) -> str:
        svid = self._state().svid
        return tm.workload(svid.spiffe_id if svid is not None else None)

    def _accepted(self, caller: Conn) -> None:
        self._tasks.spawn(self.handle(caller), "conn")

    async def handle(self, caller: Conn) -> None:
        """Serve one connection accepted on the inbound port."""
        s = self._settings
        state = self._state()
        peer = caller.transport.get_extra_info("peername")
        log = _log.bind(
            pod=s.pod,
            cluster=s.cluster,
            hop=tm.DESTINATION,
            conn=f"{s.pod}/i{next(_ids)}",
            src=f"{peer[0]}:{peer[1]}" if peer else "?",
        )
        self.total += 1
        self.active += 1
        app: Conn | None = None
        try:
            app = await self._serve(caller, state, log)
        finally:
            self.active -= 1
            self.live.pop(caller, None)
            self.calls.pop(caller, None)
            # Refusals closed gracefully already; anything still open was cancelled mid-way.
            caller.reset_if_open()
            if app is not None:
                app.reset_if_open()

    def _refuse(self, log: Any, caller: Conn, error: ProxyError, status: int = 0) -> None:
        self.refused += 1
        log.warning("inbound refused", reason=error.reason, detail=error.detail)
        text = f"{error.reason}: {error.detail}"
        tls = caller.tls  # None: a stream of a multiplexed connection, past its handshake
        if (
            status
            and tls is not None
            and tls.handshake_done
            and tls.obj.selected_alpn_protocol() == SMUX_ALPN
        ):
            caller.write(refusal(text))  # a multiplexing caller reads mux frames only
            caller.finish()
        elif status and (tls is None or tls.handshake_done):
            caller.write(encode_reply(StreamReply(status, text)))
            caller.finish()
        else:
            caller.close()

    async def _serve(self, caller: Conn, state: ProxyState, log: Any) -> Conn | None:
        s = self._settings
        started = time.monotonic()
        if state.server_ctx is None:
            self._refuse(log, caller, ProxyError("not ready", "no SVID or trust bundle yet"))
            return None
        try:
            async with asyncio.timeout(s.setup_timeout):
                ssl_obj = await caller.start_tls(state.server_ctx, server_side=True)
                self.handshakes += 1
                try:
                    caller_id = peer_identity(ssl_obj, state.bundle)
                except VerificationError as e:
                    self._refuse(log, caller, identity_failure(e), 403)
                    return None
                log = log.bind(caller=caller_id.uri)
                if ssl_obj.selected_alpn_protocol() == SMUX_ALPN:
                    self._multiplex(caller, caller_id, log)
                    return None
                raw = await caller.read_frame(split_frame, "stream header")
        except TimeoutError:
            self._refuse(log, caller, ProxyError("timeout", f"setup over {s.setup_timeout} s"))
            return None
        except ProxyError as e:
            self._refuse(log, caller, e, 400)
            return None
        return await self._proxy(caller, caller_id, raw, log, started)

    def _multiplex(self, caller: Conn, caller_id: SpiffeId, log: Any) -> None:
        """Serve the caller's connection as a `SmuxConnection`: each stream as a connection."""
        s = self._settings
        conn = SmuxConnection(
            is_client=False,
            peer=caller_id,
            max_streams=s.mux_streams,
            on_stream=lambda stream: self._stream_opened(stream, caller_id, conn),
            log=log,
        )
        try:
            conn.adopt(caller)
        except ConnectionError as e:
            log.warning("inbound refused", reason="peer closed", detail=str(e))
            return
        self.muxed[conn] = caller_id
        conn.on_closed = self._unmuxed
        log.info("inbound multiplexed", smux=conn.id)

    def _unmuxed(self, conn: SmuxConnection) -> None:
        self.muxed.pop(conn, None)

    def _stream_opened(self, caller: Conn, caller_id: SpiffeId, conn: SmuxConnection) -> None:
        self._tasks.spawn(self.handle_stream(caller, caller_id, conn.log), f"stream-{conn.id}")

    async def handle_stream(self, caller: Conn, caller_id: SpiffeId, log: Any) -> None:
        """Serve one stream of a multiplexed connection, as `handle` serves a connection."""
        s = self._settings
        log = log.bind(conn=f"{s.pod}/i{next(_ids)}")
        self.total += 1
        self.active += 1
        started = time.monotonic()
        app: Conn | None = None
        try:
            try:
                async with asyncio.timeout(s.setup_timeout):
                    raw = await caller.read_frame(split_frame, "stream header")
            except TimeoutError:
                error = ProxyError("timeout", f"no stream header in {s.setup_timeout} s")
                self._refuse(log, caller, error, 400)
                return
            except ProxyError as e:
                self._refuse(log, caller, e, 400)
                return
            app = await self._proxy(caller, caller_id, raw, log, started)
        finally:
            self.active -= 1
            self.live.pop(caller, None)
            self.calls.pop(caller, None)
            caller.reset_if_open()
            if app is not None:
                app.reset_if_open()

    async def _proxy(
        self,
        caller: Conn,
        caller_id: SpiffeId,
        raw: Mapping[str, Any],
        log: Any,
        started: float,
    ) -> Conn | None:
        """Steps 2-3 for an authenticated caller whose stream header is `raw`."""
        s = self._settings
        try:
            header = header_from_json(raw)
        except CodecError as e:
            self._refuse(log, caller, ProxyError("malformed stream header", str(e)), 400)
            return None
        log = log.bind(service=str(header.service), port=header.port)
        # The config current now, not at the handshake: one applied since (`enforce` ran
        # before this call was registered) would otherwise never reach this stream.
        routes = self._state().routes
        if not routes.serves(header.service, header.port):
            detail = f"{header.service} port {header.port} is not a known service port"
            self._refuse(log, caller, ProxyError("unknown service", detail), 404)
            return None
        policies = routes.policies(header.service)
        http = routes.protocol(header.service, header.port) in HTTP_PROTOCOLS
        call = _Call(caller_id, header.service, header.port, bool(policies) and http)
        if policies and not call.gated:
            decision = authorize(policies, AuthzRequest(caller_id.uri, header.port))
            if not decision.allowed:
                self._denied(log, call, decision, "", "")
                self._refuse(log, caller, ProxyError(AUTHZ_REFUSAL, decision.reason), 403)
                return None
        # Registered before the app's connect is awaited, so a config applied meanwhile is
        # enforced on it (`enforce`); `handle` unregisters it whatever happens.
        self.live[caller] = caller_id
        self.calls[caller] = call
        gated = call.gated and isinstance(caller, FlowConn)
        try:
            if gated:
                app: Conn = await open_flow_conn(s.app_host, header.port, "app", s.connect_timeout)
            else:
                app = await open_conn(s.app_host, header.port, "app", s.connect_timeout)
        except ProxyError as e:
            self._refuse(log, caller, ProxyError("app unavailable", e.detail), 503)
            return None
        if caller not in self.calls:  # reset by `enforce` while the app's connect was awaited
            return app
        caller.write(encode_reply(StreamReply(200)))
        log.info("inbound accepted")
        watch: _Watch | None = None
        if self.telemetry.tracing or self.telemetry.metrics:
            watch = _Watch(self.telemetry, s.cluster, header, caller_id, log, started)
            watch.workload = self._workload()
            caller.tap, app.tap = watch.tap.from_caller, watch.tap.from_app
        try:
            if gated:
                assert isinstance(caller, FlowConn)
                assert isinstance(app, FlowConn)
                error = await self._gated(caller, app, call, log)
            else:
                error = await relay(caller, app)
        except BaseException:
            app.reset_if_open()  # cancelled (the sidecar stops): the caller's owner resets it
            raise
        log = watch.connection_log(log) if watch is not None else log
        log.info(
            "inbound closed",
            bytes_received=caller.relayed,
            bytes_sent=app.relayed,
            duration_s=round(time.monotonic() - started, 3),
            **({"reason": error.reason, "detail": error.detail} if error else {}),
        )
        if watch is not None:
            watch.closed(error.reason if error else "", caller.relayed, app.relayed)
        return app

    async def _gated(
        self, caller: FlowConn, app: FlowConn, call: _Call, log: Any
    ) -> ProxyError | None:
        """Serve an HTTP stream of a service with policies: each request decided on its own,
        with the policies current when it arrives."""

        def decide(method: str | None, path: str | None) -> AuthzDecision:
            policies = self._state().routes.policies(call.service)
            return authorize(policies, AuthzRequest(call.caller.uri, call.port, method, path))

        def refused(decision: AuthzDecision, method: str, path: str) -> None:
            self._denied(log, call, decision, method, path)

        return await inbound_gate.serve(caller, app, decide, refused, log)


class _Watch:
    """The telemetry of one accepted inbound connection (see the module docstring)."""

    def __init__(
        self,
        telemetry: Telemetry,
        cluster: str,
        header: StreamHeader,
        caller: SpiffeId,
        log: Any,
        started: float,
    ) -> None:
        self.telemetry = telemetry
        self.cluster = cluster
        self.header = header
        self.service = header.service.fqdn
        self.caller = caller
        self.source_cluster = caller.trust_domain.partition(".")[0]
        self.workload = tm.UNKNOWN  # this sidecar's (the destination's)
        self.log = log
        self.started = started
        self.parent = tracecontext.parse(header.traceparent)
        self.span: Span | None = None  # the connection's, when it is not HTTP
        self.tap = HttpTap(self._request_started, self._request_finished, self._mode)

    def _attrs(self) -> dict[str, tm.AttrValue]:
        return {
            tm.SOURCE_CLUSTER: self.source_cluster,
            tm.DESTINATION_CLUSTER: self.cluster,
            tm.SERVICE: self.service,
            tm.PEER: self.caller.uri,
            "server.port": self.header.port,
        }

    def _mode(self, mode: str) -> None:
        if mode == "opaque" and self.telemetry.tracing:
            attrs = {**self._attrs(), tm.PROTOCOL: "tcp"}
            name = f"inbound {self.header.service}"
            self.span = self.telemetry.start_span(
                name, tm.DESTINATION, self.parent, attrs, server=True
            )

    def connection_log(self, log: Any) -> Any:
        return log.bind(**tm.log_ids(self.span, self.parent)) if self.tap.exchanges == 0 else log

    def _request_started(self, request: Request, exchange: Exchange) -> Any:
        parent = tracecontext.parse(request.get("traceparent")) or self.parent
        span: Span | None = None
        if self.telemetry.tracing:
            attrs = {**self._attrs(), tm.METHOD: request.method, tm.PATH: request.target}
            span = self.telemetry.start_span(
                f"inbound {request.method}", tm.DESTINATION, parent, attrs, server=True
            )
        return (span, parent, time.monotonic())

    def _request_finished(self, exchange: Exchange, error: str) -> None:
        span, parent, t0 = exchange.token
        duration = time.monotonic() - t0
        if span is not None:
            if exchange.status:
                span.set(tm.STATUS, exchange.status)
            span.end(error or ("" if exchange.status < 500 else str(exchange.status)))
        (self.log.warning if error else self.log.info)(
            "inbound request",
            method=exchange.method,
            path=exchange.target,
            status=exchange.status,
            request_bytes=exchange.request_bytes,
            response_bytes=exchange.response_bytes,
            duration_ms=round(duration * 1000, 1),
            **tm.log_ids(span, parent),
            **({"reason": error} if error else {}),
        )
        self.telemetry.record(
            tm.DESTINATION,
            "http",
            self.source_cluster,
            self.cluster,
            self.service,
            str(exchange.status),
            duration,
            exchange.request_bytes,
            exchange.response_bytes,
            **self._workloads(),
        )

    def _workloads(self) -> dict[str, str]:
        # The destination does not match routes (the source did): its `route` is empty.
        return {
            "source_workload": tm.workload(self.caller),
            "destination_workload": self.workload,
        }

    def closed(self, error: str, received: int, sent: int) -> None:
        self.tap.close(error)
        if self.span is not None:
            self.span.end(error)
        if self.tap.exchanges == 0:  # not HTTP (or nothing was asked): the connection counts
            self.telemetry.record(
                tm.DESTINATION,
                "tcp",
                self.source_cluster,
                self.cluster,
                self.service,
                "error" if error else "ok",
                time.monotonic() - self.started,
                received,
                sent,
                **self._workloads(),
            )
