"""Connection-pool limits of one service, as counters (Istio's `connectionPool`, Envoy's
circuit breakers). Pure: the pool driver asks before it acts and reports what it did.

- `maxConnections`: connections open from this sidecar to the service (all its hosts).
- `http1MaxPendingRequests`: requests waiting for a connection when none may be opened.
- `http2MaxRequests`: requests in flight to the service (every try counts; HTTP/1.1 too, as
  Envoy's `max_requests` does).

Each refusal names the limit, so the 503 and the log line say which one was exceeded.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.model import ConnectionPool

UNLIMITED = ConnectionPool()


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # short, for logs and the x-fedgate-reason header
    detail: str


class PoolBudget:
    def __init__(self, limits: ConnectionPool | None = None) -> None:
        self.limits = limits or UNLIMITED
        self.connections = 0
        self.pending = 0
        self.requests = 0

    def configure(self, limits: ConnectionPool | None) -> None:
        """New limits apply to the next decision; nothing in flight is cut."""
        self.limits = limits or UNLIMITED

    def start_request(self) -> Refusal | None:
        cap = self.limits.http2_max_requests
        if cap is not None and self.requests >= cap:
            return Refusal("max requests", f"{self.requests} requests in flight, limit {cap}")
        self.requests += 1
        return None

    def end_request(self) -> None:
        self.requests -= 1

    def may_open(self) -> bool:
        cap = self.limits.max_connections
        return cap is None or self.connections < cap

    def opened(self) -> None:
        self.connections += 1

    def closed(self) -> None:
        self.connections -= 1

    def start_waiting(self) -> Refusal | None:
        cap = self.limits.http1_max_pending_requests
        if cap is not None and self.pending >= cap:
            conns = self.limits.max_connections
            return Refusal(
                "pending overflow",
                f"{self.connections}/{conns} connections busy and {self.pending} requests "
                f"queued, limit {cap}",
            )
        self.pending += 1
        return None

    def stop_waiting(self) -> None:
        self.pending -= 1
