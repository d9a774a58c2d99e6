"""Egress: the TCP listener the cluster's own sidecars CONNECT to.

Per connection: read the CONNECT head (bounded, `mesh.connect`), find the destination cluster's
gateway in the current snapshot, open a tunnel stream naming the destination over the transport
that cluster's gateway publishes (`GatewayAddress.transport`: tls, quic or passthrough; one
`StreamDialer` per transport this gateway enables), wait for the
remote `StreamReply`, then answer `200` and splice. Every failure is answered with a status
and a reason phrase naming the hop and the cause, and logged:

* 400  malformed CONNECT, or a target this gateway does not tunnel to (its own cluster)
* 503  no route: unknown cluster, no gateway, a transport this gateway does not dial, this
       gateway is draining, the peer gateway is unreachable by its health probes or dials
       (answered at once, `gateway.pool`), or the remote ingress refused (its reason is
       passed through verbatim: "fedgate ingress west: no healthy endpoint for echo.demo")
* 502  the tunnel failed: handshake refused, connection lost, stream reset, bad reply
* 504  the handshake or the remote reply timed out

The inner bytes after the CONNECT head are the sidecars' end-to-end TLS: relayed, never read.

The same port answers `GET /fedgate/v1/peer-health` (mesh.peerhealth) with a stream of peer
health reports, so every local sidecar avoids a peer gateway the pools found down before any
call is refused, and takes it back when its probes pass (gateway.peer_feed).

Telemetry (hop `egress-gateway`): with tracing on, a CLIENT span per call, child of the
CONNECT's `traceparent`, from the CONNECT to the remote reply (the bytes after are opaque;
the access line at the call's end has their count and duration); the stream header carries
this span, and the `200` carries the remote ingress's span back (or ours) so the caller can
parent the destination sidecar's span on the hop before it. Access lines: `egress call
established` once the remote answered, `egress call` at the end (or `egress call refused` with
the reason), all with the trace and span ids; one metrics record per call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import structlog

from gateway.errors import (
    CallRefusedError,
    PeerDownError,
    PeerUnreachableError,
    TunnelError,
    TunnelTimeoutError,
)
from gateway.peer_feed import PeerHealthFeed, unreachable_peers
from gateway.splice import Splice
from gateway.transport import RESET_ABORTED, PeerTarget, Stream, StreamDialer
from mesh import peerhealth, tracecontext
from mesh import telemetry as tm
from mesh.codec import StreamHeader, encode_header
from mesh.connect import ConnectRequest, encode_response, parse_request, split_head
from mesh.errors import CodecError
from mesh.model import Snapshot
from mesh.tasks import TaskSet
from mesh.telemetry import OFF, Span, Telemetry

_log = structlog.get_logger("fedgate.gateway.egress")
_ids = itertools.count(1)


class Egress:
    """Routes CONNECTs from local sidecars into tunnels. `snapshot` is read per call."""

    def __init__(
        self,
        cluster: str,
        snapshot: Callable[[], Snapshot],
        dialers: Mapping[str, StreamDialer],
        reply_timeout: float,
        log: Any = _log,
        telemetry: Telemetry = OFF,
        resolve: Callable[[str], Awaitable[str]] | None = None,
    ) -> None:
        self.cluster = cluster
        # Published gateway hosts -> the address to dial (`gateway.resolve`); None: as is.
        self._resolve = resolve
        self.telemetry = telemetry
        self._snapshot = snapshot
        self._dialers = dialers
        self.draining = False
        self._reply_timeout = reply_timeout
        self.log = log
        self.tasks = TaskSet("gateway-egress")
        self.active: set[EgressConnection] = set()
        self.counters: dict[str, int] = {"calls": 0, "ok": 0, "refused": 0, "bytes_up": 0}
        self.counters["bytes_down"] = 0
        self.peer_health = PeerHealthFeed(lambda: unreachable_peers(dialers), log=log)
        self._feed: asyncio.Task[None] | None = None

    def watch_peers(self, transport: asyncio.WriteTransport) -> None:
        """A sidecar subscribes to peer health (gateway.peer_feed)."""
        self.peer_health.subscribe(transport)
        if self._feed is None or self._feed.done():
            self._feed = self.tasks.spawn(self.peer_health.run(), "peer-health")

    def protocol(self) -> EgressConnection:
        return EgressConnection(self)

    def target(self, request: ConnectRequest) -> PeerTarget:
        """Where a CONNECT goes, from the current snapshot, or CallRefusedError."""
        if request.cluster == self.cluster:
            raise CallRefusedError(
                400, f"cluster {request.cluster} is local; call the endpoint directly"
            )
        info = self._snapshot().cluster(request.cluster)
        if info is None:
            raise CallRefusedError(503, f"unknown cluster {request.cluster}")
        gw = info.gateway
        if gw is None:
            raise CallRefusedError(503, f"cluster {request.cluster} has no gateway")
        if gw.transport not in self._dialers:
            enabled = ", ".join(sorted(self._dialers)) or "none"
            raise CallRefusedError(
                503,
                f"gateway of {request.cluster} speaks {gw.transport}; this gateway dials {enabled}",
            )
        return PeerTarget(
            request.cluster, gw.tunnel_host, gw.tunnel_port, info.trust_domain, gw.transport
        )

    async def open(self, request: ConnectRequest, span: Span | None = None) -> tuple[Stream, str]:
        """Open a tunnel stream for `request`; wait for the remote 200 (else CallRefusedError).
        Returns the stream and the traceparent to answer with (the remote hop's span)."""
        if self.draining:
            raise CallRefusedError(503, "gateway draining")
        target = self.target(request)
        hop = f"tunnel to {target.cluster}"
        try:
            if self._resolve is not None:
                # The pool keys connections on the address: a new one retires the old links.
                target = dataclasses.replace(target, host=await self._resolve(target.host))
            stream = await self._dialers[target.transport].open_stream(target)
        except TunnelTimeoutError as e:
            raise PeerUnreachableError(504, f"{hop}: {e}") from e
        except PeerDownError as e:  # failed its health probes or dials: no wait for a dial
            raise PeerUnreachableError(503, f"{hop}: {e}") from e
        except TunnelError as e:
            raise PeerUnreachableError(502, f"{hop}: {e}") from e
        traceparent = span.context.format() if span is not None else request.traceparent
        header = StreamHeader(
            request.service, request.port, request.cluster, traceparent, request.labels
        )
        try:
            stream.write(encode_header(header))
        except CodecError as e:  # e.g. a huge traceparent
            stream.reset("bad header", RESET_ABORTED)
            raise CallRefusedError(400, f"cannot send the stream header: {e}") from e
        try:
            async with asyncio.timeout(self._reply_timeout):
                reply = await stream.read_reply()
        except TimeoutError as e:
            stream.reset("no reply", RESET_ABORTED)
            raise CallRefusedError(504, f"{hop}: no reply within {self._reply_timeout:g}s") from e
        except TunnelError as e:  # the link died under the stream
            stream.reset("no reply", RESET_ABORTED)
            raise PeerUnreachableError(502, f"{hop}: {e}") from e
        if reply.status != 200:
            stream.reset(f"refused {reply.status}", RESET_ABORTED)
            if not 400 <= reply.status <= 599:
                raise CallRefusedError(502, f"{hop}: peer answered status {reply.status}")
            # The remote reason names its own hop ("fedgate ingress west: ...").
            raise CallRefusedError(
                reply.status, reply.reason or f"{hop}: refused with {reply.status}"
            )
        return stream, reply.traceparent or traceparent

    async def aclose(self) -> None:
        await self.tasks.aclose()
        for conn in list(self.active):
            conn.abort("gateway shutting down")


class EgressConnection(Splice):
    """One sidecar connection: CONNECT head, then (once routed) a relay."""

    def __init__(self, egress: Egress) -> None:
        super().__init__(on_done=self._done)
        self._egress = egress
        self._id = next(_ids)
        self._head = b""
        self._routing = False
        self._early_eof = False
        self._started = time.monotonic()
        self._request: ConnectRequest | None = None
        self._span: Span | None = None
        self._code = ""
        self._watching = False  # a peer-health subscriber, not a call
        self.log = egress.log.bind(cluster=egress.cluster, conn=f"e{self._id}", hop=tm.EGRESS)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._egress.active.add(self)

    def data_received(self, data: bytes) -> None:
        if self.stream is not None:
            super().data_received(data)
            return
        if self._watching:  # a subscriber has nothing more to say
            return
        if self._routing:  # not reading while routing, but a chunk may already be queued
            self._head += data
            return
        self._head += data
        try:
            got = split_head(self._head)
            if got is None:
                return
            head, rest = got
            if peerhealth.is_request(head):
                self._watching = True
                self._egress.watch_peers(self._writer())
                return
            request = parse_request(head)
        except CodecError as e:
            self.log.warning("egress call refused", status=400, reason=f"malformed CONNECT: {e}")
            self._answer(400, f"malformed CONNECT: {e}")
            return
        self._request = request
        self._head = rest
        self._routing = True
        assert self.transport is not None
        self.transport.pause_reading()
        self._egress.counters["calls"] += 1
        self._egress.tasks.spawn(self._route(request), f"route-e{self._id}")

    def _writer(self) -> asyncio.WriteTransport:
        # uvloop's TCPTransport is no asyncio.WriteTransport subclass, but has its methods.
        assert self.transport is not None
        return cast(asyncio.WriteTransport, self.transport)

    def eof_received(self) -> bool:
        if self.stream is not None:
            return super().eof_received()
        if self._watching:
            return False  # the subscriber left: close
        self._early_eof = True
        self._tcp_eof = True
        return self._routing  # keep the socket open only if a route is being set up

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handing_off:
            return  # the socket lives on in a zero-copy relay, which ends the call
        self._egress.active.discard(self)
        if self._watching:
            self._egress.peer_health.unsubscribe(self._writer())
            return
        if self.stream is None:
            self._finish("client went away" if self._routing else "closed before CONNECT")
            return
        super().connection_lost(exc)

    async def _route(self, request: ConnectRequest) -> None:
        tel = self._egress.telemetry
        parent = tracecontext.parse(request.traceparent)
        span: Span | None = None
        if tel.tracing:
            span = self._span = tel.start_span(
                f"egress {request.service}",
                tm.EGRESS,
                parent,
                {
                    tm.SOURCE_CLUSTER: self._egress.cluster,
                    tm.DESTINATION_CLUSTER: request.cluster,
                    tm.SERVICE: request.service.fqdn,
                    "server.port": request.port,
                },
                server=False,
            )
        log = self.log.bind(
            peer=request.cluster,
            service=str(request.service),
            port=request.port,
            **tm.log_ids(span, parent),
        )
        self.log = log
        try:
            stream, traceparent = await self._egress.open(request, span)
        except CallRefusedError as r:
            self._code = str(r.status)
            log.warning("egress call refused", status=r.status, reason=r.reason)
            if span is not None:
                span.set(tm.STATUS, r.status)
                span.end(r.reason)
                self._span = None
            self._answer(r.status, r.reason, isinstance(r, PeerUnreachableError))
            return
        if span is not None:
            span.set(tm.STATUS, 200)
            span.end()
            self._span = None
        transport = self.transport
        if transport is None or transport.is_closing():
            stream.reset("client went away", RESET_ABORTED)
            return
        transport.write(encode_response(200, "Connection established", traceparent))
        # A stream may carry a pooled inner connection for minutes: say it is up now, as Envoy
        # flushes a tunnel's access log once established; `egress call` follows at its end.
        log.info("egress call established", duration_ms=_ms_since(self._started))
        self.start(stream)
        if self._head:
            stream.write(self._head)
            self._head = b""
        if self._early_eof:
            stream.write_eof()
            self._maybe_close()
        if not self.zero_copy():
            transport.resume_reading()

    def _answer(self, status: int, reason: str, peer_unreachable: bool = False) -> None:
        hop = f"fedgate egress {self._egress.cluster}"
        text = reason if reason.startswith("fedgate ") else f"{hop}: {reason}"
        self._egress.counters["refused"] += 1
        if self.transport is not None and not self.transport.is_closing():
            answer = encode_response(status, text, peer_unreachable=peer_unreachable)
            self.transport.write(answer)
            self.transport.close()
        self._finish(f"{status} {text}")

    def _done(self, _: Splice, outcome: str) -> None:
        self._egress.active.discard(self)
        if self._span is not None:  # the caller left while the call was being routed
            self._span.end(outcome)
            self._span = None
        request = self._request
        tel = self._egress.telemetry
        if tel.metrics and request is not None:
            stream = self.stream
            tel.record(
                tm.EGRESS,
                "tcp",
                self._egress.cluster,
                request.cluster,
                request.service.fqdn,
                self._code or ("ok" if outcome == "ok" else "error"),
                time.monotonic() - self._started,
                stream.bytes_out if stream is not None else 0,
                stream.bytes_in if stream is not None else 0,
            )
        if self.stream is None:
            return
        counters = self._egress.counters
        counters["bytes_up"] += self.stream.bytes_out
        counters["bytes_down"] += self.stream.bytes_in
        ok = outcome == "ok"
        if ok:
            counters["ok"] += 1
        (self.log.info if ok else self.log.warning)(
            "egress call",
            outcome=outcome,
            bytes_up=self.stream.bytes_out,
            bytes_down=self.stream.bytes_in,
            duration_ms=_ms_since(self._started),
        )


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
