"""The federation's data model: what agents publish, what the controller merges and serves.

Everything here is an immutable value. Config generation is a pure function from these values to
a `Snapshot`; components keep the last `Snapshot` they accepted and route from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mesh.naming import ServiceKey, SpiffeId

PROTOCOLS = ("TCP", "HTTP", "HTTP2", "GRPC")


@dataclass(frozen=True, order=True, slots=True)
class ServicePort:
    """One port of a service. MCS merges ports by name, then by (protocol, port)."""

    name: str
    port: int
    protocol: str = "TCP"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is outside 1..65535")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")


@dataclass(frozen=True, order=True, slots=True)
class Endpoint:
    """A ready pod backing a service in one cluster; `address` is reachable only in-cluster."""

    cluster: str
    address: str
    pod: str
    identity: SpiffeId


@dataclass(frozen=True, slots=True)
class ServiceExport:
    """One cluster's ServiceExport with the endpoints it has for the service."""

    cluster: str
    key: ServiceKey
    ports: tuple[ServicePort, ...]
    # Creation time of the export (seconds since the epoch): MCS says the oldest export wins
    # on conflicting fields.
    created: float
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    """Where a cluster's east-west gateway listens.

    `tunnel_*` faces the other gateways (the WAN); `egress_*` faces the cluster's own sidecars.
    """

    tunnel_host: str
    tunnel_port: int
    egress_host: str
    egress_port: int
    transport: str = "quic"


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """What an agent publishes about its cluster, besides exports."""

    name: str
    trust_domain: str
    gateway: GatewayAddress | None
    roots: tuple[str, ...]  # PEM roots vouching for `trust_domain` only
    network: str = ""
    region: str = ""
    zone: str = ""


@dataclass(frozen=True, slots=True)
class Condition:
    """A Kubernetes-style status condition (`Valid`, `Conflict`, ...)."""

    type: str
    status: bool
    reason: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class MergedService:
    """A ServiceImport: the clusterset view of one service after the MCS merge."""

    key: ServiceKey
    vip: str
    ports: tuple[ServicePort, ...]
    clusters: tuple[str, ...]
    endpoints: tuple[Endpoint, ...]
    conditions: tuple[Condition, ...] = ()

    def port(self, number: int) -> ServicePort | None:
        return next((p for p in self.ports if p.port == number), None)

    def endpoints_in(self, cluster: str) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.endpoints if e.cluster == cluster)


@dataclass(frozen=True, slots=True)
class ClusterWeight:
    """A weight for `local`, `remote` or a named cluster (relative, need not add to 100)."""

    cluster: str
    weight: int


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    key: ServiceKey
    cluster_weights: tuple[ClusterWeight, ...] = ()


def _frozen_bundle(bundle: Mapping[str, tuple[str, ...]]) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType(dict(bundle))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole config a proxy runs on, versioned by the controller."""

    version: str
    clusters: tuple[ClusterInfo, ...]
    services: tuple[MergedService, ...]
    policies: tuple[TrafficPolicy, ...] = ()
    # Federated trust bundle: trust domain -> PEM roots that may vouch for that domain only.
    trust_bundle: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _frozen_bundle({}))

    def cluster(self, name: str) -> ClusterInfo | None:
        return next((c for c in self.clusters if c.name == name), None)

    def service(self, key: ServiceKey) -> MergedService | None:
        return next((s for s in self.services if s.key == key), None)

    def service_by_vip(self, vip: str) -> MergedService | None:
        return next((s for s in self.services if s.vip == vip), None)

    def policy(self, key: ServiceKey) -> TrafficPolicy | None:
        return next((p for p in self.policies if p.key == key), None)


EMPTY_SNAPSHOT = Snapshot(version="", clusters=(), services=())
