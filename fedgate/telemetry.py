"""Telemetry set-up for one process: request metrics, and tracing (fedgate.tracing) if asked.

`setup(TelemetrySettings)` returns the `mesh.telemetry.Telemetry` the data plane is given.
Tracing is on only with an OTLP endpoint (`--otlp-endpoint`, or the standard
`OTEL_EXPORTER_OTLP_ENDPOINT`, read by the CLI): then a `TracerProvider` with a batching OTLP
exporter is built for this process (never installed as the global provider, so nothing else
in the process starts exporting behind our back). Without one, no SDK object exists and no
OpenTelemetry module is even imported: the OTLP exporter alone weighs ~5 MiB of RSS.

Request metrics use prometheus_client's default `REGISTRY` (other parts of fedgate add their
own metrics there); `exposition()` is what the admin port's `/metrics` serves. Label children
are cached per label set, so a request costs a dict lookup and four increments.
What this module does not do: metrics about the control plane (config pushes, certificates,
tunnel RTT), or sampling policies beyond "follow the caller, else sample" (ParentBased).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram

from mesh import telemetry as names
from mesh.telemetry import OFF, AttrValue, Span, Telemetry
from mesh.tracecontext import TraceParent

if TYPE_CHECKING:  # the SDK is imported (fedgate.tracing) only when tracing is on
    from opentelemetry.sdk.trace.export import SpanExporter

    from fedgate.tracing import Tracing

LABELS = (
    "reporter",
    "source_cluster",
    "destination_cluster",
    "destination_service",
    "response_code",
    "request_protocol",
    "route",
    "source_workload",
    "destination_workload",
)
# Istio's default buckets (ms) in seconds: sub-millisecond hops to 10 s calls.
BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter("fedgate_requests", "HTTP requests and TCP connections seen by a hop.", LABELS)
DURATION = Histogram(
    "fedgate_request_duration_seconds",
    "Duration of HTTP requests (to the response's end) and TCP connections, per hop.",
    LABELS,
    buckets=BUCKETS,
)
REQUEST_BYTES = Counter(
    "fedgate_request_bytes", "Bytes from caller to callee (HTTP body, or TCP payload).", LABELS
)
RESPONSE_BYTES = Counter(
    "fedgate_response_bytes", "Bytes from callee to caller (HTTP body, or TCP payload).", LABELS
)


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """Parsed by the CLI. `otlp_endpoint`: "" (tracing off), `http://host:port`,
    `https://host:port` (TLS with the system roots) or `unix:/path` (plaintext)."""

    service: str  # OpenTelemetry `service.name`: fedgate-sidecar, fedgate-gateway
    instance: str  # `service.instance.id`: the node id (pod.cluster, gateway.cluster)
    cluster: str
    otlp_endpoint: str = ""
    metrics: bool = True


class ProcessTelemetry:
    """`mesh.telemetry.Telemetry` for one process."""

    def __init__(self, tracing: Tracing | None, metrics: bool) -> None:
        self.tracing = tracing is not None
        self.metrics = metrics
        self._tracing = tracing
        self._children: dict[tuple[str, ...], tuple[Any, Any, Any, Any]] = {}

    def start_span(
        self,
        name: str,
        hop: str,
        parent: TraceParent | None,
        attrs: Mapping[str, AttrValue],
        *,
        server: bool,
    ) -> Span:
        assert self._tracing is not None, "start_span with tracing off"
        return self._tracing.span(name, {names.HOP: hop, **attrs}, parent, server)

    def record(
        self,
        hop: str,
        protocol: str,
        source_cluster: str,
        destination_cluster: str,
        service: str,
        code: str,
        duration_s: float,
        request_bytes: int,
        response_bytes: int,
        *,
        route: str = "",
        source_workload: str = names.UNKNOWN,
        destination_workload: str = names.UNKNOWN,
    ) -> None:
        if not self.metrics:
            return
        reporter = names.REPORTER.get(hop, hop)
        key = (
            reporter,
            source_cluster,
            destination_cluster,
            service,
            code,
            protocol,
            route,
            source_workload,
            destination_workload,
        )
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                REQUESTS.labels(*key),
                DURATION.labels(*key),
                REQUEST_BYTES.labels(*key),
                RESPONSE_BYTES.labels(*key),
            )
        requests, duration, sent, received = children
        requests.inc()
        duration.observe(duration_s)
        if request_bytes:
            sent.inc(request_bytes)
        if response_bytes:
            received.inc(response_bytes)

    def shutdown(self) -> None:
        """Flush spans still queued (bounded by the exporter's timeout) and stop exporting."""
        if self._tracing is not None:
            self._tracing.provider.shutdown()


def exporter_for(endpoint: str) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    if not endpoint.startswith(("http://", "https://", "unix:")):
        raise ValueError(f"OTLP endpoint {endpoint!r} must start with http://, https:// or unix:")
    # gRPC takes `unix:/path` as is; the exporter needs to be told it is plaintext.
    return OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))


def setup(s: TelemetrySettings, exporter: SpanExporter | None = None) -> Telemetry:
    """The process's telemetry. Tracing with `s.otlp_endpoint` (or `exporter`, for tests and
    the bench); without either and without metrics, `mesh.telemetry.OFF`. Without tracing, no
    OpenTelemetry module is imported at all (docs/footprint.md)."""
    if exporter is None and s.otlp_endpoint:
        exporter = exporter_for(s.otlp_endpoint)
    if exporter is None:
        return ProcessTelemetry(None, True) if s.metrics else OFF
    from fedgate.tracing import Tracing

    return ProcessTelemetry(Tracing(s.service, s.instance, s.cluster, exporter), s.metrics)
