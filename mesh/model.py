"""The federation's data model: what agents publish, what the controller merges and serves.

Everything here is an immutable value. Config generation is a pure function from these values to
a `Snapshot`; components keep the last `Snapshot` they accepted and route from it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mesh.naming import ServiceKey, SpiffeId

PROTOCOLS = ("TCP", "HTTP", "HTTP2", "GRPC")
# The protocols whose calls the sidecars parse per request (AuthorizationPolicy HTTP fields).
HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC"})


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
    # The pod's labels as sorted (key, value) pairs (subsets select on them, e.g. `version`).
    labels: tuple[tuple[str, str], ...] = ()

    def has_labels(self, wanted: tuple[tuple[str, str], ...]) -> bool:
        """Whether every (key, value) of `wanted` is among this endpoint's labels."""
        return all(pair in self.labels for pair in wanted)


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


# --- traffic policy (runtime form of the GitOps `TrafficPolicy` document) ------------------
#
# Durations are float seconds and percentages floats in 0..100. A field left as None (or an
# empty tuple) is not configured: the data plane applies its own default. The YAML schema, its
# validation and the field-by-field reference live in federation/schema.py and docs/config.md.

SPECIAL_CLUSTERS = ("local", "remote")
RETRY_CONDITIONS = (
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "refused-stream",  # the upstream never processed it (HTTP/2 REFUSED_STREAM, GOAWAY)
    "retriable-status-codes",
    # gRPC (Istio accepts these in the same retryOn list): the answer's grpc-status.
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
)
STRING_MATCH_KINDS = ("exact", "prefix", "regex")


@dataclass(frozen=True, slots=True)
class ClusterWeight:
    """A weight for `local`, `remote` or a named cluster.

    The GitOps schema requires a policy's weights to sum to 100; routing treats them as relative
    (a weighted cluster without endpoints is dropped and the rest renormalised).
    """

    cluster: str
    weight: int


@dataclass(frozen=True, slots=True)
class Subset:
    """A named group of a service's endpoints: those carrying every label in `labels`."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()  # sorted (key, value) pairs


@dataclass(frozen=True, slots=True)
class SubsetWeight:
    subset: str
    weight: int


@dataclass(frozen=True, slots=True)
class LocalityFailover:
    """Priority tiers: same cluster, then same region, then any cluster.

    When the healthy share of a tier's endpoints falls below `spill_over_threshold` percent, the
    missing share of traffic spills proportionally to the next tier (graded, not all-or-nothing).
    """

    spill_over_threshold: float = 70.0


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int
    per_try_timeout: float | None = None
    retry_on: tuple[str, ...] = ()  # conditions from RETRY_CONDITIONS
    retriable_status_codes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    max_connections: int | None = None
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Istio's defaults: eject after 5 consecutive 5xx, scan every 10 s, for 30 s, at most 10 %."""

    consecutive_5xx_errors: int = 5
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: float = 10.0


@dataclass(frozen=True, slots=True)
class FaultDelay:
    percentage: float
    fixed_delay: float


@dataclass(frozen=True, slots=True)
class FaultAbort:
    percentage: float
    http_status: int


@dataclass(frozen=True, slots=True)
class Fault:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True, slots=True)
class Mirror:
    """Copy `percentage` % of requests to the same service in `cluster` and/or `subset`."""

    cluster: str = ""  # "" = wherever routing picks; else `local`, `remote` or a cluster name
    subset: str = ""
    percentage: float = 100.0


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: str  # one of STRING_MATCH_KINDS
    value: str


@dataclass(frozen=True, slots=True)
class RequestMatch:
    """Matches when the path matches `uri` (if set) AND every header matches (names lower-case)."""

    uri: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()


@dataclass(frozen=True, slots=True)
class HttpRoute:
    """A request-level override: the first route with a matching `matches` entry applies.

    Fields left unset inherit the policy's own; requests matching no route use the policy's.
    """

    name: str
    matches: tuple[RequestMatch, ...]
    cluster_weights: tuple[ClusterWeight, ...] = ()
    subset_weights: tuple[SubsetWeight, ...] = ()
    retries: Retries | None = None
    timeout: float | None = None
    fault: Fault | None = None
    mirror: Mirror | None = None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """Everything the source side applies to calls to one service (Istio's VirtualService and
    DestinationRule in one document)."""

    key: ServiceKey
    cluster_weights: tuple[ClusterWeight, ...] = ()
    subsets: tuple[Subset, ...] = ()
    subset_weights: tuple[SubsetWeight, ...] = ()
    locality_failover: LocalityFailover | None = None
    retries: Retries | None = None
    timeout: float | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    fault: Fault | None = None
    mirror: Mirror | None = None
    routes: tuple[HttpRoute, ...] = ()

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)


# --- authorization (runtime form of the GitOps `AuthorizationPolicy` document) ----------------

AUTHZ_ACTIONS = ("ALLOW", "DENY")


def principal_matches(pattern: str, principal: str) -> bool:
    """`pattern` is an exact SPIFFE ID, `*` (any caller), or a SPIFFE ID with `*` wildcards,
    each matching any run of characters except `/` (e.g. `spiffe://*.fedgate.local/ns/demo/sa/*`).
    """
    if pattern == "*":
        return True
    if "*" not in pattern:
        return pattern == principal
    regex = "[^/]*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, principal) is not None


@dataclass(frozen=True, slots=True)
class AuthzSource:
    """Istio's `rules[].from[].source`: the caller matches `principals` (none listed: any
    caller) and none of `not_principals`."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()

    def matches(self, principal: str) -> bool:
        if self.principals and not any(principal_matches(p, principal) for p in self.principals):
            return False
        return not any(principal_matches(p, principal) for p in self.not_principals)


@dataclass(frozen=True, slots=True)
class AuthzOperation:
    """Istio's `rules[].to[].operation`: every field listed must match (an empty one matches
    all). `methods`, `paths` and their `not_` twins are HTTP fields: they apply to ports whose
    protocol is HTTP, HTTP2 or GRPC only (`mesh.authz` says what happens elsewhere)."""

    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()

    @property
    def http_fields(self) -> tuple[str, ...]:
        """The HTTP-only fields this operation uses, by their GitOps names."""
        named = (
            ("methods", self.methods),
            ("notMethods", self.not_methods),
            ("paths", self.paths),
            ("notPaths", self.not_paths),
        )
        return tuple(name for name, values in named if values)


@dataclass(frozen=True, slots=True)
class AuthorizationRule:
    """Matches a call when one of `sources` matches the caller (none listed: any caller) and
    one of `operations` matches the call (none listed: any call)."""

    sources: tuple[AuthzSource, ...] = ()
    operations: tuple[AuthzOperation, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    """Who may call `key`, and how (`name` is unique within `key.namespace`). Evaluation, with
    Istio's semantics, is `mesh.authz`."""

    name: str
    key: ServiceKey
    action: str = "ALLOW"  # one of AUTHZ_ACTIONS
    rules: tuple[AuthorizationRule, ...] = ()

    def __post_init__(self) -> None:
        if self.action not in AUTHZ_ACTIONS:
            raise ValueError(f"action {self.action!r} is not one of {', '.join(AUTHZ_ACTIONS)}")

    @property
    def ref(self) -> str:
        """`<namespace>/<name>`, as refusals name the policy."""
        return f"{self.key.namespace}/{self.name}"


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
    authorization: tuple[AuthorizationPolicy, ...] = ()
    # Deny list (revocation), sorted: exact SPIFFE IDs (`spiffe://<td>/ns/<ns>/sa/<sa>`) or
    # whole trust domains (`spiffe://<td>`). Every verifier refuses a match (ca.verify).
    denied: tuple[str, ...] = ()

    def cluster(self, name: str) -> ClusterInfo | None:
        return next((c for c in self.clusters if c.name == name), None)

    def service(self, key: ServiceKey) -> MergedService | None:
        return next((s for s in self.services if s.key == key), None)

    def service_by_vip(self, vip: str) -> MergedService | None:
        return next((s for s in self.services if s.vip == vip), None)

    def policy(self, key: ServiceKey) -> TrafficPolicy | None:
        return next((p for p in self.policies if p.key == key), None)

    def authorization_for(self, key: ServiceKey) -> tuple[AuthorizationPolicy, ...]:
        return tuple(p for p in self.authorization if p.key == key)


EMPTY_SNAPSHOT = Snapshot(version="", clusters=(), services=())
