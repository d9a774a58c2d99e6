"""An in-memory `mesh.telemetry.Telemetry` for loopback tests: every span and record kept."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh import telemetry as tm
from mesh.telemetry import AttrValue, Span
from mesh.tracecontext import TraceParent


@dataclass(eq=False)
class FakeSpan:
    name: str
    hop: str
    parent: TraceParent | None
    server: bool
    context: TraceParent
    attributes: dict[str, AttrValue] = field(default_factory=dict)
    events: list[tuple[str, dict[str, AttrValue]]] = field(default_factory=list)
    error: str | None = None  # None until ended

    def set(self, key: str, value: AttrValue) -> None:
        self.attributes[key] = value

    def event(self, name: str, attrs: Mapping[str, AttrValue]) -> None:
        self.events.append((name, dict(attrs)))

    def end(self, error: str = "") -> None:
        assert self.error is None, "ended twice"
        self.error = error


@dataclass(frozen=True)
class Record:
    hop: str
    protocol: str
    source_cluster: str
    destination_cluster: str
    service: str
    code: str
    request_bytes: int
    response_bytes: int
    route: str = ""
    source_workload: str = tm.UNKNOWN
    destination_workload: str = tm.UNKNOWN


class FakeTelemetry:
    tracing = True
    metrics = True

    def __init__(self) -> None:
        self.spans: list[FakeSpan] = []
        self.records: list[Record] = []

    def start_span(
        self,
        name: str,
        hop: str,
        parent: TraceParent | None,
        attrs: Mapping[str, AttrValue],
        *,
        server: bool,
    ) -> Span:
        trace_id = parent.trace_id if parent is not None else secrets.token_hex(16)
        context = TraceParent(trace_id, secrets.token_hex(8))
        span = FakeSpan(name, hop, parent, server, context, dict(attrs))
        self.spans.append(span)
        return span

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
        source_workload: str = tm.UNKNOWN,
        destination_workload: str = tm.UNKNOWN,
    ) -> None:
        rec = Record(
            hop,
            protocol,
            source_cluster,
            destination_cluster,
            service,
            code,
            request_bytes,
            response_bytes,
            route,
            source_workload,
            destination_workload,
        )
        self.records.append(rec)


def source_spans(tel: FakeTelemetry, n: int, trace_id: str, app_span: str) -> list[FakeSpan]:
    """The `n` source-sidecar spans, each checked: a CLIENT child of the app's span, ended
    without error."""
    spans = [s for s in tel.spans if s.hop == tm.SOURCE]
    assert len(spans) == n, spans
    for span in spans:
        assert span.context.trace_id == trace_id
        assert span.parent is not None
        assert span.parent.span_id == app_span
        assert not span.server
        assert span.error == ""
    return spans
