"""Where a per-connection (TCP) call goes: the outbound's route step, as pure functions.

`steer` turns a captured connection's original destination into a `Target`, from the route
table alone (`sidecar.routes.RouteTable`, built from the snapshot; a `*.svc.clusterset.local`
name reaches here as its service's VIP, which the sidecar's DNS answered with):

| original destination            | target                                             |
|---------------------------------|----------------------------------------------------|
| a mesh VIP and one of its ports | `Mesh(route)`: the dial step picks `Local`/`Remote` |
| a mesh VIP, another port        | `Refused("unknown port")`: the app gets a reset     |
| anything else                   | `Passthrough`: straight to that address, no mTLS    |

`Leg` is where one try went (a `sidecar.routes.Decision` seen from the log line and the span),
and `Access` is everything the connection's one log line says of its route and upstream,
typed, turned into structlog fields only by `log_fields`. No I/O and no clock: the driver is
`sidecar.outbound.Outbound`; dial tries are `sidecar.tcp_tries`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.http.exchange import Dialed
from sidecar.routes import Decision, Local, Remote, RouteTable, ServiceRoute


@dataclass(frozen=True, slots=True)
class Mesh:
    """A mesh service port: routed, in mutual TLS."""

    route: ServiceRoute


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Not a mesh address: connect to it as the app asked."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Refused:
    """A connection that cannot be served at all (the reason goes into the log line)."""

    reason: str
    detail: str


Target = Mesh | Passthrough | Refused


def steer(routes: RouteTable, dst: tuple[str, int]) -> Target:
    """The target of a connection captured on its way to `dst`."""
    route = routes.lookup(*dst)
    if route is not None:
        return Mesh(route)
    if routes.is_vip(dst[0]):
        return Refused("unknown port", f"mesh VIP {dst[0]} has no port {dst[1]}")
    return Passthrough(*dst)


@dataclass(frozen=True, slots=True)
class Leg:
    """Where one try of a per-connection call went (what its log line and span say)."""

    mode: str = ""  # "passthrough" outside the mesh
    dst_cluster: str = ""
    endpoint: str = ""
    gateway: str = ""

    @classmethod
    def of(cls, decision: Decision, local_cluster: str) -> Leg:
        match decision:
            case Local(endpoint=ep):
                return cls(dst_cluster=local_cluster, endpoint=ep.address)
            case Remote(cluster=cluster, egress=egress):
                return cls(dst_cluster=cluster, gateway=f"{egress.host}:{egress.port}")
            case _:
                raise AssertionError(f"unknown route decision {decision!r}")


PASSTHROUGH = Leg(mode="passthrough")


@dataclass(frozen=True, slots=True)
class Access:
    """What a per-connection call's log line says of where it went: the route (a mesh call),
    the last try's leg, how many tries, and what setting up the upstream learned."""

    route: ServiceRoute | None = None
    leg: Leg | None = None
    tries: int = 0
    dialed: Dialed | None = None

    def log_fields(self) -> dict[str, object]:
        """The fields for structlog, the known ones only (a failed call: `tries` if > 1)."""
        out: dict[str, object] = {}
        if self.route is not None:
            out.update(service=str(self.route.service), port=self.route.port.port)
        if self.leg is not None:
            for name in ("mode", "dst_cluster", "endpoint", "gateway"):
                if value := getattr(self.leg, name):
                    out[name] = value
        if self.tries > 1:
            out["tries"] = self.tries
        if self.dialed is not None:
            out.update(peer=self.dialed.peer.uri, tls_resumed=self.dialed.tls_resumed)
            if self.dialed.smux:
                out["smux"] = self.dialed.smux
        return out
