"""The GitOps documents as pydantic models: `Federation`, `TrafficPolicy`, `AuthorizationPolicy`.

Every document is Kubernetes-shaped (`apiVersion: fedgate.io/v1alpha1`, `kind`, `metadata`,
`spec`) and uses Istio's field names where Istio has the concept (`retries.perTryTimeout`,
`outlierDetection.consecutive5xxErrors`, `connectionPool.http.http1MaxPendingRequests`, ...).
Models are strict: an unknown field, a string where a number belongs, or a number where a
duration string belongs is an error, never silently ignored or coerced.

These models check one document in isolation. Rules that span fields or documents (weights sum
to 100, referenced clusters and subsets exist, duplicate names, one policy per service) live in
`federation.gitops.checks`; the field-by-field reference is docs/config.md; `json_schema()` is
what `fedgate config schema` publishes (docs/schema/fedgate.schema.json).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic.json_schema import models_json_schema

from federation.schema_types import (
    API_VERSION,
    ClusterRef,
    Duration,
    HeaderName,
    Host,
    HttpMethod,
    Label,
    PathPattern,
    Percent,
    Port,
    Principal,
    Regex,
    ServiceHost,
    Strict,
    TrustDomain,
    Weight,
)

SCHEMA_ID = "https://fedgate.io/schema/v1alpha1/fedgate.schema.json"
Transport = Literal["tls", "quic", "passthrough"]

# --- metadata -----------------------------------------------------------------------------------


class ClusterScopedMetadata(Strict):
    name: Label
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class Metadata(ClusterScopedMetadata):
    namespace: Label


# --- TrafficPolicy ------------------------------------------------------------------------------


class ClusterWeight(Strict):
    cluster: ClusterRef
    weight: Weight


class Subset(Strict):
    name: Label
    labels: dict[str, str] = Field(min_length=1)


class SubsetWeight(Strict):
    subset: Label
    weight: Weight


class LocalityFailover(Strict):
    """Tiers: same cluster, same region, any. A tier whose healthy share of endpoints is under
    `spillOverThreshold` percent spills the missing share to the next tier."""

    spill_over_threshold: Percent = 70.0


class Retries(Strict):
    attempts: int = Field(ge=0, le=10)
    per_try_timeout: Duration | None = None
    retry_on: str | None = None  # Istio's comma-separated list; checked in federation.gitops.checks


class TcpPool(Strict):
    max_connections: int = Field(ge=1)


class HttpPool(Strict):
    http1_max_pending_requests: int | None = Field(default=None, ge=1)
    http2_max_requests: int | None = Field(default=None, ge=1)


class ConnectionPool(Strict):
    tcp: TcpPool | None = None
    http: HttpPool | None = None


class OutlierDetection(Strict):
    consecutive_5xx_errors: int = Field(default=5, ge=1)
    interval: Duration = "10s"
    base_ejection_time: Duration = "30s"
    max_ejection_percent: Percent = 10.0


class Percentage(Strict):
    value: Percent


class Delay(Strict):
    percentage: Percentage
    fixed_delay: Duration


class Abort(Strict):
    percentage: Percentage
    http_status: int = Field(ge=200, le=599)


class Fault(Strict):
    delay: Delay | None = None
    abort: Abort | None = None

    @model_validator(mode="after")
    def _one(self) -> Fault:
        if self.delay is None and self.abort is None:
            raise ValueError("a fault needs a delay, an abort or both")
        return self


class Mirror(Strict):
    cluster: ClusterRef | None = None
    subset: Label | None = None

    @model_validator(mode="after")
    def _target(self) -> Mirror:
        if self.cluster is None and self.subset is None:
            raise ValueError(
                "a mirror needs a cluster, a subset or both (else it copies to itself)"
            )
        return self


class StringMatch(Strict):
    exact: str | None = None
    prefix: str | None = None
    regex: Regex | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StringMatch:
        if sum(v is not None for v in (self.exact, self.prefix, self.regex)) != 1:
            raise ValueError("set exactly one of exact, prefix, regex")
        return self


class Match(Strict):
    uri: StringMatch | None = None
    headers: dict[HeaderName, StringMatch] = {}


class _Overrides(Strict):
    cluster_weights: list[ClusterWeight] = []
    subset_weights: list[SubsetWeight] = []
    retries: Retries | None = None
    timeout: Duration | None = None
    fault: Fault | None = None
    mirror: Mirror | None = None
    mirror_percentage: Percentage | None = None


class Route(_Overrides):
    """Applies to requests matching any entry of `match`; unset fields inherit the policy's."""

    name: Label
    match: list[Match] = Field(min_length=1)


class TrafficPolicySpec(_Overrides):
    host: ServiceHost
    subsets: list[Subset] = []
    locality_failover: LocalityFailover | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    routes: list[Route] = []


class TrafficPolicyDocument(Strict):
    """How callers reach one service: weights, failover, resilience, experiments."""

    api_version: Literal["fedgate.io/v1alpha1"]
    kind: Literal["TrafficPolicy"]
    metadata: Metadata
    spec: TrafficPolicySpec


# --- Federation ---------------------------------------------------------------------------------


class Locality(Strict):
    region: Label
    zone: Label | None = None


class GatewayAddress(Strict):
    """Where peers reach a cluster's east-west gateway (an IP or a DNS name)."""

    address: Host
    port: Port = 15443


class ClusterSpec(Strict):
    name: Label
    network: Label | None = None
    locality: Locality | None = None
    trust_domain: TrustDomain | None = None  # default: <name>.<spec.domain>
    gateways: list[GatewayAddress] = []
    roots: list[str] = []  # PEM certificates vouching for trust_domain only


class Link(Strict):
    """The tunnel transport between two clusters' gateways (overrides `defaults.transport`)."""

    clusters: list[Label] = Field(min_length=2, max_length=2)
    transport: Transport


class ServiceDefaults(Strict):
    """Service-level settings a TrafficPolicy that leaves them unset inherits."""

    locality_failover: LocalityFailover | None = None
    retries: Retries | None = None
    timeout: Duration | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None


class FederationDefaults(Strict):
    transport: Transport = "tls"
    traffic_policy: ServiceDefaults | None = None


class FederationSpec(Strict):
    domain: TrustDomain = "fedgate.local"
    clusters: list[ClusterSpec] = Field(min_length=1)
    links: list[Link] = []
    defaults: FederationDefaults = FederationDefaults()


class FederationDocument(Strict):
    """The clusters of the federation and federation-wide defaults (at most one per repository)."""

    api_version: Literal["fedgate.io/v1alpha1"]
    kind: Literal["Federation"]
    metadata: ClusterScopedMetadata
    spec: FederationSpec


# --- AuthorizationPolicy ------------------------------------------------------------------------


class Source(Strict):
    """The caller: one of `principals` (absent: anyone) and none of `notPrincipals`."""

    principals: list[Principal] = []
    not_principals: list[Principal] = Field(default=[], alias="notPrincipals")

    @model_validator(mode="after")
    def _some(self) -> Source:
        if not self.principals and not self.not_principals:
            raise ValueError("a source names principals or notPrincipals")
        return self


class From(Strict):
    source: Source


class Operation(Strict):
    """The call: every field given must match. `methods`, `paths` and their `not` forms are
    HTTP fields (for ports whose protocol is HTTP, HTTP2 or GRPC); a path is exact, a prefix
    `/api/*`, a suffix `*.html`, or `*`."""

    ports: list[Port] = []
    not_ports: list[Port] = Field(default=[], alias="notPorts")
    methods: list[HttpMethod] = []
    not_methods: list[HttpMethod] = Field(default=[], alias="notMethods")
    paths: list[PathPattern] = []
    not_paths: list[PathPattern] = Field(default=[], alias="notPaths")

    @model_validator(mode="after")
    def _some(self) -> Operation:
        if not (
            self.ports
            or self.not_ports
            or self.methods
            or self.not_methods
            or self.paths
            or self.not_paths
        ):
            raise ValueError(
                "an operation names ports, notPorts, methods, notMethods, paths or notPaths"
            )
        return self


class To(Strict):
    operation: Operation


class Rule(Strict):
    """Matches when any `from` entry AND any `to` entry match (an absent list matches all)."""

    from_: list[From] = Field(default=[], alias="from")
    to: list[To] = []


class AuthorizationPolicySpec(Strict):
    host: ServiceHost
    action: Literal["ALLOW", "DENY"] = "ALLOW"
    rules: list[Rule] = []


class AuthorizationPolicyDocument(Strict):
    """Which SPIFFE IDs may call a service, on which ports (Istio's AuthorizationPolicy)."""

    api_version: Literal["fedgate.io/v1alpha1"]
    kind: Literal["AuthorizationPolicy"]
    metadata: Metadata
    spec: AuthorizationPolicySpec


Document = FederationDocument | TrafficPolicyDocument | AuthorizationPolicyDocument
DOCUMENT_MODELS: dict[str, type[Document]] = {
    "Federation": FederationDocument,
    "TrafficPolicy": TrafficPolicyDocument,
    "AuthorizationPolicy": AuthorizationPolicyDocument,
}
KINDS = tuple(DOCUMENT_MODELS)


def json_schema() -> dict[str, Any]:
    """One JSON Schema (draft 2020-12) accepting any fedgate document, for editors and CI."""
    _, top = models_json_schema(
        [(model, "validation") for model in DOCUMENT_MODELS.values()],
        by_alias=True,
        ref_template="#/$defs/{model}",
    )
    defs = top.get("$defs", {})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "fedgate configuration document",
        "description": f"A {', '.join(KINDS)} document (apiVersion {API_VERSION}).",
        "oneOf": [{"$ref": f"#/$defs/{model.__name__}"} for model in DOCUMENT_MODELS.values()],
        "$defs": defs,
    }


def known_fields() -> frozenset[str]:
    """Every field name of every document model (for 'did you mean' hints)."""
    names: set[str] = set()
    seen: set[type] = set()

    def walk(model: type[Strict]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, info in model.model_fields.items():
            names.add(info.alias or name)
            for arg in _models_in(info.annotation):
                walk(arg)

    for model in DOCUMENT_MODELS.values():
        walk(model)
    return frozenset(names)


def _models_in(annotation: Any) -> list[type[Strict]]:
    if isinstance(annotation, type) and issubclass(annotation, Strict):
        return [annotation]
    out: list[type[Strict]] = []
    for arg in getattr(annotation, "__args__", ()):
        out.extend(_models_in(arg))
    return out
