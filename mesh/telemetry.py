"""What the data plane needs from telemetry: spans and request records, as interfaces.

Sidecars and gateways call a `Telemetry` given to them by `fedgate/` (which holds the
OpenTelemetry SDK and prometheus_client, `fedgate.telemetry`). With `OFF` (the default) no
SDK is involved: callers test `telemetry.tracing` / `telemetry.metrics` before building any
attribute, so the off path costs one attribute read per request.

Hop names and attribute keys live here so every component and the docs use the same ones:
OpenTelemetry semantic-convention names where one exists (`http.request.method`,
`http.response.status_code`, `server.address`, `error.type`), `fedgate.*` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from mesh.naming import SpiffeId
from mesh.tracecontext import TraceParent

SOURCE = "source-sidecar"
EGRESS = "egress-gateway"
INGRESS = "ingress-gateway"
DESTINATION = "destination-sidecar"

# Prometheus `reporter` label by hop (Istio's names, plus `gateway`).
REPORTER = {SOURCE: "source", EGRESS: "gateway", INGRESS: "gateway", DESTINATION: "destination"}

# Request-metric label values (Istio's): a peer this hop cannot name, and the `route` of an HTTP
# request that matched none of its TrafficPolicy's routes (or whose service has no policy).
UNKNOWN = "unknown"
DEFAULT_ROUTE = "default"


def workload(identity: SpiffeId | None) -> str:
    """The `source_workload` / `destination_workload` label of a verified SPIFFE ID: its
    service account. Both ends of a call know both identities from the mutual TLS handshake
    (no metadata exchange is needed, and gateways cannot alter them), and a cluster has few
    service accounts, so the label stays bounded. On the rig every pod has its own (`client`,
    `echo`); on Kubernetes give each Deployment its own ServiceAccount, as Istio and Linkerd
    advise, or its pods share the workload `default` (docs/observability.md)."""
    return identity.service_account if identity is not None else UNKNOWN


HOP = "fedgate.hop"
SOURCE_CLUSTER = "fedgate.source.cluster"
DESTINATION_CLUSTER = "fedgate.destination.cluster"
SERVICE = "fedgate.service"
SUBSET = "fedgate.subset"
PEER = "fedgate.peer.identity"
RETRIES = "fedgate.retry.count"
REASON = "fedgate.reason"
ENDPOINT = "server.address"
METHOD = "http.request.method"
PATH = "url.path"
STATUS = "http.response.status_code"
ERROR = "error.type"
PROTOCOL = "network.protocol.name"

AttrValue = str | int | float | bool


class Span(Protocol):
    """One hop's span, started by `Telemetry.start_span`; ended exactly once."""

    @property
    def context(self) -> TraceParent:
        """This span's ids: what the next hop's `traceparent` carries, and what logs show."""
        ...

    def set(self, key: str, value: AttrValue) -> None: ...

    def event(self, name: str, attrs: Mapping[str, AttrValue]) -> None: ...

    def end(self, error: str = "") -> None:
        """End the span; `error` (a reason) marks it failed."""
        ...


class Telemetry(Protocol):
    """Spans and request records for one process."""

    tracing: bool
    metrics: bool

    def start_span(
        self,
        name: str,
        hop: str,
        parent: TraceParent | None,
        attrs: Mapping[str, AttrValue],
        *,
        server: bool,
    ) -> Span:
        """A new span of `hop`, child of `parent` (None: a new trace). `server`: the hop
        serves a caller (SERVER kind) rather than calling out (CLIENT)."""
        ...

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
        source_workload: str = UNKNOWN,
        destination_workload: str = UNKNOWN,
    ) -> None:
        """One finished request (`protocol` "http") or connection ("tcp") seen by `hop`.
        `code`: the HTTP status, or for TCP "ok" / the refusal status / "error". `route`: the
        TrafficPolicy route an HTTP request took (`DEFAULT_ROUTE` for none; "" where routes do
        not apply: TCP, gateways); the workloads: `workload()` of each end, `UNKNOWN` where the
        hop does not know it."""
        ...


class _Off:
    tracing = False
    metrics = False

    def start_span(
        self,
        name: str,
        hop: str,
        parent: TraceParent | None,
        attrs: Mapping[str, AttrValue],
        *,
        server: bool,
    ) -> Span:
        raise AssertionError("start_span with tracing off: callers check `tracing` first")

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
        source_workload: str = UNKNOWN,
        destination_workload: str = UNKNOWN,
    ) -> None:
        return None


OFF: Telemetry = _Off()


def log_ids(span: Span | None, parent: TraceParent | None = None) -> dict[str, str]:
    """The ids an access-log line carries: the span's own, or with tracing off the incoming
    trace's (so lines still join a trace another hop records)."""
    if span is not None:
        c = span.context
        return {"trace_id": c.trace_id, "span_id": c.span_id}
    if parent is not None:
        return {"trace_id": parent.trace_id}
    return {}
