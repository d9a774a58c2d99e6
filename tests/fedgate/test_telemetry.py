"""The process telemetry: SDK spans with the caller's context, metrics in the exposition."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from fedgate import admin, metrics, telemetry
from mesh import telemetry as tm
from mesh.tracecontext import parse

PARENT = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")


def _settings(endpoint: str = "", metrics: bool = True) -> telemetry.TelemetrySettings:
    return telemetry.TelemetrySettings("fedgate-test", "node-1", "east", endpoint, metrics)


def test_off_builds_nothing() -> None:
    t = telemetry.setup(_settings(metrics=False))
    assert t is tm.OFF
    assert not t.tracing
    assert not t.metrics
    with pytest.raises(AssertionError, match="tracing off"):
        t.start_span("x", tm.SOURCE, None, {}, server=False)
    metrics_only = telemetry.setup(_settings())
    assert metrics_only.metrics
    assert not metrics_only.tracing


def test_spans_continue_the_caller_and_carry_their_hop() -> None:
    exporter = InMemorySpanExporter()
    t = telemetry.setup(_settings(), exporter=exporter)
    assert isinstance(t, telemetry.ProcessTelemetry)
    assert t.tracing
    span = t.start_span("egress x", tm.EGRESS, PARENT, {tm.SERVICE: "x"}, server=False)
    assert PARENT is not None
    assert span.context.trace_id == PARENT.trace_id
    assert span.context.span_id != PARENT.span_id
    span.set(tm.STATUS, 503)
    span.event("retry", {"attempt": 1})
    span.end("no healthy endpoint")
    root = t.start_span("inbound", tm.DESTINATION, None, {}, server=True)
    root.end()
    t.shutdown()
    first, second = exporter.get_finished_spans()
    assert first.parent is not None
    assert format(first.parent.span_id, "016x") == PARENT.span_id
    assert first.kind == SpanKind.CLIENT
    assert first.attributes is not None
    assert first.attributes[tm.HOP] == tm.EGRESS
    assert first.attributes[tm.ERROR] == "no healthy endpoint"
    assert first.status.status_code == StatusCode.ERROR
    assert [e.name for e in first.events] == ["retry"]
    assert first.resource.attributes["service.name"] == "fedgate-test"
    assert second.parent is None  # no caller context: a new trace
    assert second.kind == SpanKind.SERVER
    assert format(second.context.trace_id, "032x") == root.context.trace_id


def _samples(text: str, service: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("destination_service") == service:
                assert s.labels["reporter"] == "destination"
                assert s.labels["source_cluster"] == "east"
                assert s.labels["request_protocol"] == "http"
                out[(s.name, s.labels.get("le", ""))] = s.value
    return out


def test_requests_appear_in_the_metrics_exposition() -> None:
    t = telemetry.setup(_settings())
    svc = "m.demo.svc.clusterset.local"
    assert _samples(metrics.exposition(), svc) == {}
    t.record(tm.DESTINATION, "http", "east", "west", svc, "200", 0.003, 5, 7)
    t.record(tm.DESTINATION, "http", "east", "west", svc, "200", 0.2, 0, 1)
    status, body, _ = admin.route(admin.AdminState(metrics=metrics.exposition), "/metrics")
    assert status == 200
    got = _samples(body.decode(), svc)
    assert got[("fedgate_requests_total", "")] == 2
    assert got[("fedgate_request_bytes_total", "")] == 5
    assert got[("fedgate_response_bytes_total", "")] == 8
    assert got[("fedgate_request_duration_seconds_bucket", "0.005")] == 1  # one under 5 ms
    assert got[("fedgate_request_duration_seconds_bucket", "+Inf")] == 2


def test_route_and_workload_labels_are_exposed() -> None:
    t = telemetry.setup(_settings())
    svc = "labels.demo.svc.clusterset.local"
    t.record(
        tm.SOURCE,
        "http",
        "east",
        "west",
        svc,
        "200",
        0.01,
        0,
        0,
        route="canary",
        source_workload="client",
        destination_workload="echo",
    )
    t.record(tm.EGRESS, "tcp", "east", "west", svc, "ok", 0.01, 0, 0)
    seen = set()
    for family in text_string_to_metric_families(metrics.exposition()):
        for s in family.samples:
            if s.name == "fedgate_requests_total" and s.labels["destination_service"] == svc:
                labels = s.labels
                seen.add(
                    (labels["route"], labels["source_workload"], labels["destination_workload"])
                )
    assert seen == {("canary", "client", "echo"), ("", tm.UNKNOWN, tm.UNKNOWN)}


def test_a_bad_endpoint_is_named() -> None:
    with pytest.raises(ValueError, match=r"'ftp://x' must start with http://, https:// or unix:"):
        telemetry.setup(_settings("ftp://x"))
