"""An in-process OTLP trace collector for the tests: a real gRPC server implementing the
OpenTelemetry `TraceService` (from `opentelemetry-proto`), keeping every span it receives.

It listens on a Unix socket so that processes in every rig network namespace reach it
(namespaces do not isolate the filesystem), or on loopback TCP for in-process use (bench).
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class CollectedSpan:
    service: str  # the resource's service.name
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    kind: int
    attributes: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # the status message when the span failed


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Collector(pb_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans: list[CollectedSpan] = []
        self.batches = 0
        self._server: grpc.Server | None = None
        self.endpoint = ""

    def Export(  # noqa: N802 - the gRPC method name
        self, request: pb.ExportTraceServiceRequest, context: Any
    ) -> pb.ExportTraceServiceResponse:
        got = []
        for rs in request.resource_spans:
            res = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        CollectedSpan(
                            service=str(res.get("service.name", "")),
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            error=s.status.message if s.status.code == 2 else "",
                        )
                    )
        with self._lock:
            self.spans.extend(got)
            self.batches += 1
        return pb.ExportTraceServiceResponse()

    def start(self, address: str) -> str:
        """Serve on `address` (`unix:/path` or `127.0.0.1:0`); returns the client endpoint."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_TraceServiceServicer_to_server(self, server)
        port = server.add_insecure_port(address)
        server.start()
        self._server = server
        self.endpoint = address if address.startswith("unix:") else f"http://127.0.0.1:{port}"
        return self.endpoint

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)

    def trace(self, trace_id: str) -> list[CollectedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_trace(self, trace_id: str, done: Any, timeout: float = 20.0) -> list[CollectedSpan]:
        """Poll until `done(spans of the trace)` holds; the spans either way."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.trace(trace_id)
            if done(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)


def main() -> None:
    """`python -m tests.e2e.otlp ADDRESS`: serve in its own process (the bench's collector, so
    decoding spans does not share the measured interpreter); prints the endpoint, then, once
    stdin closes, how many spans arrived."""
    import sys

    collector = Collector()
    print(collector.start(sys.argv[1]), flush=True)
    sys.stdin.read()
    print(len(collector.spans), flush=True)
    collector.stop()


if __name__ == "__main__":
    main()
