"""What one request's telemetry reports, pure: filled in as the exchange goes, read at its end.

`sidecar.traffic.attempt` fills in where the request went and how it ended; the drivers add the
bytes and a failure after the response head. At the end the driver turns the record into the
source span's attributes and error, the metrics record (`mesh.telemetry.Telemetry.record`) and
the access line's fields, all from here, so HTTP/1.1, HTTP/2 and gRPC report the same way.
Nothing here starts or ends a span (spans live in drivers).
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh import telemetry as tm
from mesh.naming import SpiffeId
from mesh.telemetry import AttrValue
from sidecar.traffic.balance import Target


@dataclass(slots=True)
class RequestRecord:
    """A request's outcome as telemetry reports it."""

    status: int = 0  # 0: no response reached the app
    reason: str = ""  # why the sidecar answered or failed it ("" when the upstream answered)
    dst_cluster: str = ""
    endpoint: str = ""
    subset: str = ""
    retries: int = 0
    grpc_status: int | None = None  # gRPC: from the trailers, or a Trailers-Only answer
    request_bytes: int = 0
    response_bytes: int = 0
    route: str = ""  # the metrics' `route` label, set by `routed`
    source_workload: str = tm.UNKNOWN
    destination_workload: str = tm.UNKNOWN

    def routed(self, route: str, own: SpiffeId | None) -> None:
        """The request matched `route` ("" for none) in a sidecar running as `own`."""
        self.route = route or tm.DEFAULT_ROUTE
        self.source_workload = tm.workload(own)

    def went_to(self, target: Target) -> None:
        """The final try's target: the destination workload is the endpoint's identity, or,
        for a remote cluster (whose ingress picks the endpoint), the one identity its endpoints
        share; several: unknown (the label must not guess)."""
        if target.endpoint is not None:
            self.destination_workload = tm.workload(target.endpoint.identity)
        elif len(names := {i.service_account for i in target.identities}) == 1:
            self.destination_workload = names.pop()

    def span_attributes(self, service: str) -> dict[str, AttrValue]:
        """What the source span gets set at its end."""
        attrs: dict[str, AttrValue] = {
            tm.SERVICE: service,
            tm.DESTINATION_CLUSTER: self.dst_cluster,
            tm.RETRIES: self.retries,
        }
        if self.endpoint:
            attrs[tm.ENDPOINT] = self.endpoint
        if self.subset:
            attrs[tm.SUBSET] = self.subset
        if self.status:
            attrs[tm.STATUS] = self.status
        if self.grpc_status is not None:
            attrs[GRPC_STATUS] = self.grpc_status
        return attrs

    def span_error(self) -> str:
        """The span's error: the sidecar's reason, else a 5xx from upstream, else none came."""
        if self.reason:
            return self.reason
        if not self.status:
            return "no response"
        return f"status {self.status}" if self.status >= 500 else ""

    @property
    def code(self) -> str:
        """The metrics record's response code."""
        return str(self.status or 0)


GRPC_STATUS = "rpc.grpc.status_code"  # OpenTelemetry's semantic-convention name
