"""Both gateways' spans, access lines and metrics for one tunnelled call, on every transport."""

from __future__ import annotations

import asyncio

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import LogCapture

from fedgate import metrics, telemetry
from mesh import telemetry as tm
from mesh.connect import response_traceparent
from mesh.naming import ServiceKey
from mesh.tracecontext import parse
from tests.gateway.conftest import ECHO, Pair, close_writer, connect_via

APP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _traced(
    pair: Pair,
) -> tuple[InMemorySpanExporter, InMemorySpanExporter, list[telemetry.ProcessTelemetry]]:
    out = []
    exporters = (InMemorySpanExporter(), InMemorySpanExporter())
    for gw, exporter in zip((pair.east, pair.west), exporters, strict=True):
        settings = telemetry.TelemetrySettings("fedgate-gateway", gw.settings.cluster, "x")
        t = telemetry.setup(settings, exporter=exporter)
        assert isinstance(t, telemetry.ProcessTelemetry)
        gw.egress.telemetry = gw.ingress.telemetry = t
        out.append(t)
    return exporters[0], exporters[1], out


def _calls(service: ServiceKey, code: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(metrics.exposition()):
        for s in family.samples:
            if (
                s.name == "fedgate_requests_total"
                and s.labels["destination_service"] == service.fqdn
                and s.labels["response_code"] == code
                and s.labels["reporter"] == "gateway"
            ):
                total += s.value
    return total


async def test_a_call_is_two_spans_in_order_and_the_reply_names_the_ingress(
    tpair: Pair, logs: LogCapture
) -> None:
    east_spans, west_spans, tels = _traced(tpair)
    before = _calls(ECHO, "ok")
    host, port = tpair.east.egress_address
    reader, writer = await asyncio.open_connection(host, port)
    request = (
        f"CONNECT {ECHO.fqdn}:7000 HTTP/1.1\r\nHost: {ECHO.fqdn}:7000\r\n"
        f"Fedgate-Cluster: west\r\ntraceparent: {APP}\r\n\r\n"
    )
    writer.write(request.encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 "), head
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    await close_writer(writer)
    for t in tels:
        t.shutdown()  # flushes
    [egress] = east_spans.get_finished_spans()
    [ingress] = west_spans.get_finished_spans()
    app = parse(APP)
    assert app is not None
    assert egress.parent is not None
    assert format(egress.parent.span_id, "016x") == app.span_id
    assert format(egress.context.trace_id, "032x") == app.trace_id
    assert ingress.parent is not None
    assert ingress.parent.span_id == egress.context.span_id
    assert egress.attributes is not None
    assert ingress.attributes is not None
    assert egress.attributes[tm.HOP] == tm.EGRESS
    assert ingress.attributes[tm.HOP] == tm.INGRESS
    # passthrough authenticates no peer gateway: the source cluster is not known there.
    source = "unknown" if tpair.transport == "passthrough" else "east"
    assert ingress.attributes[tm.SOURCE_CLUSTER] == source
    assert ingress.attributes[tm.ENDPOINT] == "127.0.0.1"
    # The 200 hands the caller the ingress's span, for the destination sidecar to hang under.
    reply = parse(response_traceparent(head[:-4]))
    assert reply is not None
    assert int(reply.span_id, 16) == ingress.context.span_id
    # Access lines: established at once, then the end, all with the trace.
    established = [e for e in logs.entries if e["event"].endswith("call established")]
    assert {e["hop"] for e in established} == {tm.EGRESS, tm.INGRESS}
    assert {e["trace_id"] for e in established} == {app.trace_id}

    for _ in range(250):  # both gateways count the call when its stream ended: poll, bounded
        if _calls(ECHO, "ok") >= before + 2:
            break
        await asyncio.sleep(0.02)
    assert _calls(ECHO, "ok") == before + 2


async def test_a_refusal_ends_both_spans_with_the_reason_and_counts_its_status(
    tpair: Pair, logs: LogCapture
) -> None:
    east_spans, west_spans, tels = _traced(tpair)
    missing = ServiceKey("demo", "missing")
    before = _calls(missing, "503")
    status, reason, _, writer = await connect_via(tpair.east, service=missing, traceparent=APP)
    await close_writer(writer)
    assert status == 503
    assert reason == "fedgate ingress west: unknown service missing.demo"
    for t in tels:
        t.shutdown()
    [egress] = east_spans.get_finished_spans()
    [ingress] = west_spans.get_finished_spans()
    assert egress.status.description == reason
    assert ingress.status.description == reason
    refused = [
        e for e in logs.entries if e["event"] in ("egress call refused", "ingress call refused")
    ]
    assert {(e["hop"], e["reason"]) for e in refused} == {(tm.EGRESS, reason), (tm.INGRESS, reason)}
    assert _calls(missing, "503") == before + 2
