"""Tracing with the OpenTelemetry SDK, for a process that has an OTLP endpoint.

Imported by `fedgate.telemetry` only when tracing is on, so a process without an endpoint never
loads the SDK (docs/footprint.md). `Tracing` holds the process's `TracerProvider` and starts
spans under a caller's W3C context; what it does not do: choose whether to trace, or metrics.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace import TraceFlags as OtelFlags

from mesh import telemetry as names
from mesh.telemetry import AttrValue, Span
from mesh.tracecontext import TraceParent


class _Span:
    """`mesh.telemetry.Span` over an SDK span."""

    __slots__ = ("_span", "context")

    def __init__(self, span: trace.Span) -> None:
        self._span = span
        c = span.get_span_context()
        self.context = TraceParent(
            format(c.trace_id, "032x"), format(c.span_id, "016x"), int(c.trace_flags)
        )

    def set(self, key: str, value: AttrValue) -> None:
        self._span.set_attribute(key, value)

    def event(self, name: str, attrs: Mapping[str, AttrValue]) -> None:
        self._span.add_event(name, dict(attrs))

    def end(self, error: str = "") -> None:
        if error:
            self._span.set_attribute(names.ERROR, error)
            self._span.set_status(Status(StatusCode.ERROR, error))
        self._span.end()


class Tracing:
    """The process's `TracerProvider` (batching to `exporter`) and its spans."""

    def __init__(self, service: str, instance: str, cluster: str, exporter: SpanExporter) -> None:
        resource = Resource.create(
            {"service.name": service, "service.instance.id": instance, "fedgate.cluster": cluster}
        )
        self.provider = TracerProvider(resource=resource)
        # Bounded queue (2,048 spans, the SDK default): beyond it spans are dropped, never
        # waited for; exports run on the processor's own thread, off the event loop.
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
        self._tracer = self.provider.get_tracer("fedgate")

    def span(
        self, name: str, attrs: dict[str, AttrValue], up: TraceParent | None, server: bool
    ) -> Span:
        """A span under the caller's context `up` (None: a new trace)."""
        ctx = Context()  # never the ambient context: a task may inherit another call's
        if up is not None:
            remote = SpanContext(
                int(up.trace_id, 16), int(up.span_id, 16), True, OtelFlags(up.flags)
            )
            ctx = trace.set_span_in_context(NonRecordingSpan(remote), ctx)
        kind = SpanKind.SERVER if server else SpanKind.CLIENT
        return _Span(self._tracer.start_span(name, context=ctx, kind=kind, attributes=attrs))
