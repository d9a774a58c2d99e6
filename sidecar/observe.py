"""A request's telemetry in the source sidecar's drivers (hop `source-sidecar`), one way for
HTTP/1.1, HTTP/2 and gRPC.

With tracing on, `Observation.begin` starts one CLIENT span per request, child of the app's
`traceparent` (or a new trace); the forwarders inject it upstream in the app's place (on a
connection a try opened through a gateway, the remote ingress's span instead, so the
destination hangs under the hop before it); retries are span events (`sidecar.http.exchange`).
`Observation.end` sets what the request's `RequestRecord` (`sidecar.traffic.record`) says on
the span, ends it, and writes one metrics record. The access line (`http request`, or `http
request failed` with the reason) carries `log_ids()`. With tracing and metrics off, no
observation is made at all.

Also here: the log lines and counter of outlier ejections, for HTTP and TCP alike.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any

from mesh import telemetry as tm
from mesh import tracecontext
from mesh.telemetry import Span, Telemetry
from mesh.tracecontext import TraceParent
from sidecar.traffic.outlier import Ejected
from sidecar.traffic.outlier import Event as OutlierEvent
from sidecar.traffic.record import RequestRecord

HTTP = "http"
GRPC = "grpc"
PROTOCOL_VERSION = "network.protocol.version"


@dataclass(eq=False, slots=True)
class Observation:
    """One request's span (tracing on), record and start time."""

    telemetry: Telemetry
    cluster: str  # the source cluster
    protocol: str  # the metrics record's: "http" or "grpc"
    span: Span | None
    parent: TraceParent | None
    record: RequestRecord
    started: float

    @classmethod
    def begin(
        cls,
        telemetry: Telemetry,
        cluster: str,
        method: str,
        path: str,
        traceparent: str | None,
        *,
        protocol: str = HTTP,
        attrs: dict[str, tm.AttrValue] | None = None,
    ) -> Observation | None:
        """None when neither tracing nor metrics is on."""
        if not (telemetry.tracing or telemetry.metrics):
            return None
        started = time.monotonic()
        parent = tracecontext.parse(traceparent)
        span: Span | None = None
        if telemetry.tracing:
            span = telemetry.start_span(
                f"outbound {method}",
                tm.SOURCE,
                parent,
                {tm.SOURCE_CLUSTER: cluster, tm.METHOD: method, tm.PATH: path, **(attrs or {})},
                server=False,
            )
        return cls(telemetry, cluster, protocol, span, parent, RequestRecord(), started)

    def log_ids(self) -> dict[str, str]:
        return tm.log_ids(self.span, self.parent)

    def end(self, service: str) -> None:
        rec = self.record
        if self.span is not None:
            for key, value in rec.span_attributes(service).items():
                self.span.set(key, value)
            self.span.end(rec.span_error())
        self.telemetry.record(
            tm.SOURCE,
            self.protocol,
            self.cluster,
            rec.dst_cluster,
            service,
            rec.code,
            time.monotonic() - self.started,
            rec.request_bytes,
            rec.response_bytes,
            route=rec.route,
            source_workload=rec.source_workload,
            destination_workload=rec.destination_workload,
        )


def log_outlier_events(
    events: list[OutlierEvent], log: Any, stats: collections.Counter[str], now: float
) -> None:
    """Log and count outlier detection's events, then clear the list."""
    for event in events:
        if isinstance(event, Ejected):
            stats["ejections"] += 1
            log.warning(
                "outlier ejected",
                host=event.host,
                consecutive_failures=event.consecutive,
                for_s=round(event.until - now, 3),
            )
        else:
            log.info("outlier returned", host=event.host)
    events.clear()
