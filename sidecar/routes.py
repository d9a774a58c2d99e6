"""The sidecar's route table: a pure function of a `Snapshot` and the local cluster's name.

A connection captured to `(VIP, port)` is looked up here. A known service port yields a
`ServiceRoute`, whose `decide(rng)` picks where this one call goes:

- `Local(endpoint)`: straight to the endpoint's sidecar inbound port, in this cluster;
- `Remote(cluster, egress)`: through this cluster's gateway egress, which carries it to `cluster`.

Cluster weights come from `mesh.routing.cluster_weights` with the service's `TrafficPolicy`;
the choice itself (subsets, locality tiers, health, retries avoiding tried hosts) is the
route's `Balancer` (`sidecar.traffic.balance`): `decide` for a TCP connection, `target` and
`decision_for` for each try of an HTTP request.
Endpoints in other clusters are unreachable when the local cluster publishes no gateway; as
Istio drops endpoints of networks without a gateway, they are then left out before weighting.
Each decision carries the SPIFFE IDs the server end of the inner TLS may present.

This module does no I/O and holds no mutable state: a new snapshot builds a new table.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from mesh.errors import NoRouteError
from mesh.model import (
    AuthorizationPolicy,
    Endpoint,
    MergedService,
    ServicePort,
    Snapshot,
    TrafficPolicy,
)
from mesh.naming import ServiceKey, SpiffeId
from mesh.routing import ClusterChoice, cluster_weights
from sidecar.traffic.balance import Balancer, Healthy, Target
from sidecar.traffic.match import Effective, effective


@dataclass(frozen=True, slots=True)
class Egress:
    """Where the local cluster's gateway accepts CONNECTs from its own sidecars."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Local:
    endpoint: Endpoint
    identities: frozenset[SpiffeId]


@dataclass(frozen=True, slots=True)
class Remote:
    cluster: str
    egress: Egress
    identities: frozenset[SpiffeId]
    labels: tuple[tuple[str, str], ...] = ()  # a subset's: the remote ingress picks by them


Decision = Local | Remote


@dataclass(frozen=True, slots=True)
class ServiceRoute:
    """One service port as this cluster's sidecars see it."""

    service: ServiceKey
    port: ServicePort
    local_cluster: str
    choices: tuple[ClusterChoice, ...]
    endpoints: Mapping[str, tuple[Endpoint, ...]]  # cluster -> endpoints
    egress: Egress | None
    policy: TrafficPolicy | None = None
    regions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def balancer(self) -> Balancer:
        return Balancer(self.local_cluster, self.endpoints, self.regions, self.policy)

    def decide(self, rng: random.Random, healthy: Healthy | None = None) -> Decision:
        """Where one TCP connection goes (the policy without route matching); NoRouteError if
        nowhere."""
        if not self.choices:
            raise NoRouteError(f"{self.service} has no reachable endpoint")
        eff = effective(self.policy, None)
        target = self.balancer.pick(eff, rng, healthy) if healthy else self.balancer.pick(eff, rng)
        return self.decision_for(target)

    def target(
        self,
        eff: Effective,
        rng: random.Random,
        healthy: Healthy,
        exclude: frozenset[str] = frozenset(),
        *,
        subset: str | None = None,
        cluster_ref: str = "",
    ) -> Target:
        """Where one try of a request goes (see `sidecar.traffic.balance`)."""
        if not self.choices:
            raise NoRouteError(f"{self.service} has no reachable endpoint")
        return self.balancer.pick(
            eff, rng, healthy, exclude, subset=subset, cluster_ref=cluster_ref
        )

    def decision_for(self, target: Target) -> Decision:
        if target.endpoint is not None:
            return Local(target.endpoint, target.identities)
        if self.egress is None:  # excluded when building; kept as a guard for hand-built routes
            raise NoRouteError(
                f"cluster {self.local_cluster} has no gateway to reach {target.cluster}"
            )
        return Remote(target.cluster, self.egress, target.identities, target.labels)


def _route(
    service: MergedService,
    port: ServicePort,
    policy: TrafficPolicy | None,
    local_cluster: str,
    egress: Egress | None,
    regions: Mapping[str, str] = MappingProxyType({}),
) -> ServiceRoute:
    reachable = service
    if egress is None:
        reachable = replace(service, endpoints=service.endpoints_in(local_cluster))
    by_cluster: dict[str, list[Endpoint]] = {}
    for ep in reachable.endpoints:
        by_cluster.setdefault(ep.cluster, []).append(ep)
    return ServiceRoute(
        service=service.key,
        port=port,
        local_cluster=local_cluster,
        choices=cluster_weights(reachable, policy, local_cluster),
        endpoints=MappingProxyType({c: tuple(sorted(es)) for c, es in by_cluster.items()}),
        egress=egress,
        policy=policy,
        regions=regions,
    )


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Lookups from (VIP, port) and from service name; build with `RouteTable.build`."""

    version: str
    local_cluster: str
    egress: Egress | None
    routes: Mapping[tuple[str, int], ServiceRoute]
    vips: Mapping[ServiceKey, str]
    addresses: frozenset[str]
    ports: Mapping[ServiceKey, frozenset[int]]  # every known service, with or without a VIP
    # The protocol of each known service port, and each service's AuthorizationPolicies
    # (what the inbound enforces; a service without any is absent).
    protocols: Mapping[tuple[ServiceKey, int], str] = field(
        default_factory=lambda: MappingProxyType({})
    )
    authorization: Mapping[ServiceKey, tuple[AuthorizationPolicy, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    @classmethod
    def build(cls, snapshot: Snapshot, local_cluster: str) -> RouteTable:
        info = snapshot.cluster(local_cluster)
        gw = info.gateway if info is not None else None
        egress = Egress(gw.egress_host, gw.egress_port) if gw is not None else None
        routes: dict[tuple[str, int], ServiceRoute] = {}
        vips: dict[ServiceKey, str] = {}
        ports: dict[ServiceKey, frozenset[int]] = {}
        protocols: dict[tuple[ServiceKey, int], str] = {}
        authorization: dict[ServiceKey, list[AuthorizationPolicy]] = {}
        for authz in snapshot.authorization:
            authorization.setdefault(authz.key, []).append(authz)
        regions = MappingProxyType({c.name: c.region for c in snapshot.clusters})
        for service in snapshot.services:
            ports[service.key] = frozenset(p.port for p in service.ports)
            protocols.update({(service.key, p.port): p.protocol for p in service.ports})
            if not service.vip:  # not allocated yet: neither resolvable nor routable
                continue
            vips[service.key] = service.vip
            policy = snapshot.policy(service.key)
            for port in service.ports:
                routes[(service.vip, port.port)] = _route(
                    service, port, policy, local_cluster, egress, regions
                )
        return cls(
            version=snapshot.version,
            local_cluster=local_cluster,
            egress=egress,
            routes=MappingProxyType(routes),
            vips=MappingProxyType(vips),
            addresses=frozenset(vips.values()),
            ports=MappingProxyType(ports),
            protocols=MappingProxyType(protocols),
            authorization=MappingProxyType({k: tuple(v) for k, v in authorization.items()}),
        )

    @classmethod
    def empty(cls, local_cluster: str) -> RouteTable:
        empty: Mapping[Any, Any] = MappingProxyType({})
        return cls("", local_cluster, None, empty, empty, frozenset(), empty)

    def is_vip(self, address: str) -> bool:
        return address in self.addresses

    def lookup(self, address: str, port: int) -> ServiceRoute | None:
        """The route for a captured destination; None if it is not a mesh VIP and port."""
        return self.routes.get((address, port))

    def serves(self, service: ServiceKey, port: int) -> bool:
        """Whether `service` is known and declares `port` (what an inbound may connect to)."""
        return port in self.ports.get(service, frozenset())

    def protocol(self, service: ServiceKey, port: int) -> str:
        return self.protocols.get((service, port), "TCP")

    def policies(self, service: ServiceKey) -> tuple[AuthorizationPolicy, ...]:
        """The AuthorizationPolicies of `service` (empty: every authenticated caller)."""
        return self.authorization.get(service, ())

    def vip_of(self, service: ServiceKey) -> str | None:
        return self.vips.get(service)

    def describe(self) -> list[dict[str, object]]:
        """Per service port: VIP, clusters and their effective weights (for the admin page)."""
        return [
            {
                "service": r.service.fqdn,
                "vip": vip,
                "port": port,
                "weights": {c.cluster: round(c.weight, 4) for c in r.choices},
                "endpoints": {c: len(es) for c, es in sorted(r.endpoints.items())},
            }
            for (vip, port), r in sorted(self.routes.items())
        ]
