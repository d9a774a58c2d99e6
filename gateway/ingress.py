"""Ingress: serve tunnel streams from peer gateways with this cluster's endpoints.

For each stream whose header arrived, whatever the transport (over `tls` and `quic` the peer
gateway is already authenticated and authorized by the mTLS handshake; over `passthrough` it is
not, and the endpoint's sidecar authenticates the caller): the service must exist in the
snapshot, have the requested port and have endpoints in *this* cluster; one is picked
(`mesh.routing.pick_endpoint`), its sidecar inbound port is dialled, and the stream is
answered `200` and spliced. Otherwise the stream is answered with an error reply whose reason
names this hop and the cause:

* 421  the header names another cluster (misdirected)
* 503  unknown service, no such port, no healthy endpoint here (with the subset's labels, when
       the header names some), this gateway is draining
* 502  the endpoint refused the connection / 504 the connection timed out

Telemetry (hop `ingress-gateway`): with tracing on, a SERVER span per stream, child of the
header's `traceparent`, from the header to the endpoint's connection (or the refusal); the
`200` reply carries it back so the caller can parent the destination sidecar on it. Access
lines: `ingress call established` once the endpoint is connected, `ingress call` at the
stream's end (or `ingress call refused` with the reason); one metrics record per stream.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from typing import Any

import structlog

from gateway.errors import CallRefusedError
from gateway.splice import Splice
from gateway.transport import Stream
from mesh import telemetry as tm
from mesh import tracecontext
from mesh.codec import StreamHeader, StreamReply, encode_reply
from mesh.connect import format_labels
from mesh.errors import NoRouteError
from mesh.model import Endpoint, Snapshot
from mesh.routing import pick_endpoint
from mesh.tasks import TaskSet
from mesh.telemetry import OFF, Span, Telemetry

_log = structlog.get_logger("fedgate.gateway.ingress")
# The source cluster of a stream whose peer is not authenticated (passthrough).
UNKNOWN_PEER = "unknown"
_ids = itertools.count(1)


class Ingress:
    def __init__(
        self,
        cluster: str,
        snapshot: Callable[[], Snapshot],
        inbound_port: int,
        connect_timeout: float = 5.0,
        rng: random.Random | None = None,
        log: Any = _log,
        telemetry: Telemetry = OFF,
    ) -> None:
        self.cluster = cluster
        self.telemetry = telemetry
        self._snapshot = snapshot
        self._inbound_port = inbound_port
        self._connect_timeout = connect_timeout
        self._rng = rng or random.Random()
        self.log = log
        self.tasks = TaskSet("gateway-ingress")
        self.active: set[Splice] = set()
        self.counters: dict[str, int] = {"calls": 0, "ok": 0, "refused": 0}
        self.draining = False

    def route(self, header: StreamHeader) -> Endpoint:
        """The endpoint serving `header` here, or CallRefusedError (pure given the snapshot)."""
        if header.cluster and header.cluster != self.cluster:
            raise CallRefusedError(421, f"stream for cluster {header.cluster} reached this gateway")
        service = self._snapshot().service(header.service)
        if service is None:
            raise CallRefusedError(503, f"unknown service {header.service}")
        if service.port(header.port) is None:
            raise CallRefusedError(503, f"{header.service} has no port {header.port}")
        endpoints = service.endpoints_in(self.cluster)
        if header.labels:  # a subset: only endpoints carrying all its labels
            endpoints = tuple(e for e in endpoints if e.has_labels(header.labels))
        try:
            return pick_endpoint(endpoints, self._rng)
        except NoRouteError as e:
            subset = f" with labels {format_labels(header.labels)}" if header.labels else ""
            raise CallRefusedError(503, f"no healthy endpoint for {header.service}{subset}") from e

    def handle(self, stream: Stream, header: StreamHeader) -> None:
        """`StreamHandler` of the tunnel server: never raises."""
        self.counters["calls"] += 1
        parent = tracecontext.parse(header.traceparent)
        call = _Call(header, time.monotonic())
        if self.telemetry.tracing:
            call.span = self.telemetry.start_span(
                f"ingress {header.service}",
                tm.INGRESS,
                parent,
                {
                    tm.SOURCE_CLUSTER: stream.peer_cluster or UNKNOWN_PEER,
                    tm.DESTINATION_CLUSTER: self.cluster,
                    tm.SERVICE: header.service.fqdn,
                    "server.port": header.port,
                },
                server=True,
            )
        log = self.log.bind(
            cluster=self.cluster,
            hop=tm.INGRESS,
            peer=stream.peer_cluster,
            conn=f"i{next(_ids)}",
            stream=stream.id,
            service=str(header.service),
            port=header.port,
            **tm.log_ids(call.span, parent),
        )
        try:
            if self.draining:
                raise CallRefusedError(503, "gateway draining")
            endpoint = self.route(header)
        except CallRefusedError as r:
            self._refuse(stream, r, log, call)
            return
        self.tasks.spawn(self._dial(stream, endpoint, log, call), f"dial-{stream.id}")

    async def _dial(self, stream: Stream, endpoint: Endpoint, log: Any, call: _Call) -> None:
        loop = asyncio.get_running_loop()
        started = call.started
        target = f"{endpoint.address}:{self._inbound_port}"
        if call.span is not None:
            call.span.set(tm.ENDPOINT, endpoint.address)

        def done(splice: Splice, outcome: str) -> None:
            self.active.discard(splice)
            ok = outcome == "ok"
            if ok:
                self.counters["ok"] += 1
            (log.info if ok else log.warning)(
                "ingress call",
                endpoint=target,
                outcome=outcome,
                bytes_up=stream.bytes_in,
                bytes_down=stream.bytes_out,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
                **({} if ok else {"reason": outcome}),
            )
            self._record(stream, call, "ok" if ok else "error")

        # The reply names the span the destination sidecar should hang under: ours, or with
        # tracing off the caller's, passed on unchanged.
        reply = StreamReply(200, traceparent=_format(call.span) or call.header.traceparent)
        splice = Splice(stream, preamble=encode_reply(reply), on_done=done)
        self.active.add(splice)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: splice, endpoint.address, self._inbound_port),
                self._connect_timeout,
            )
        except TimeoutError:
            self.active.discard(splice)
            refusal = CallRefusedError(504, f"endpoint {target} timed out")
            self._refuse(stream, refusal, log, call)
            return
        except OSError as e:
            self.active.discard(splice)
            refusal = CallRefusedError(502, f"endpoint {target}: {e.strerror or e}")
            self._refuse(stream, refusal, log, call)
            return
        log.info(
            "ingress call established",
            endpoint=target,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        if call.span is not None:
            call.span.set(tm.STATUS, 200)
            call.span.end()

    def _refuse(self, stream: Stream, r: CallRefusedError, log: Any, call: _Call) -> None:
        self.counters["refused"] += 1
        reason = f"fedgate ingress {self.cluster}: {r.reason}"
        log.warning("ingress call refused", status=r.status, reason=reason)
        stream.refuse(r.status, reason)
        if call.span is not None:
            call.span.set(tm.STATUS, r.status)
            call.span.end(reason)
        self._record(stream, call, str(r.status))

    def _record(self, stream: Stream, call: _Call, code: str) -> None:
        if self.telemetry.metrics:
            self.telemetry.record(
                tm.INGRESS,
                "tcp",
                stream.peer_cluster or UNKNOWN_PEER,
                self.cluster,
                call.header.service.fqdn,
                code,
                time.monotonic() - call.started,
                stream.bytes_in,
                stream.bytes_out,
            )

    async def aclose(self) -> None:
        await self.tasks.aclose()
        for splice in list(self.active):
            splice.abort("gateway shutting down")


class _Call:
    """One stream's telemetry state."""

    __slots__ = ("header", "span", "started")

    def __init__(self, header: StreamHeader, started: float) -> None:
        self.header = header
        self.started = started
        self.span: Span | None = None


def _format(span: Span | None) -> str:
    return span.context.format() if span is not None else ""
