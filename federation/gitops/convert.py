"""Schema-valid documents -> the runtime model (`mesh.model`) and the Federation's etcd JSON.

Pure. Durations become float seconds, Istio's `retryOn` string becomes conditions and status
codes, `mirror` + `mirrorPercentage` become one `Mirror`, and fields a TrafficPolicy leaves
unset take the Federation's `defaults.trafficPolicy`. Only documents that passed
`federation.gitops.checks` reach here, so a ValueError from this module is a bug.
"""

from __future__ import annotations

from typing import Any

from federation import schema as s
from federation.schema_types import parse_duration
from mesh import model as m
from mesh.naming import ServiceKey, trust_domain_for

Json = dict[str, Any]

# Istio's default retryOn, without its gRPC-only conditions.
DEFAULT_RETRY_ON = "connect-failure,reset,503"


def parse_retry_on(text: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """`"5xx,reset,503"` -> (("5xx", "reset", "retriable-status-codes"), (503,)).

    Status codes imply `retriable-status-codes`, as in Istio. Raises ValueError naming the entry.
    """
    conditions: list[str] = []
    codes: list[int] = []
    for raw in text.split(","):
        item = raw.strip()
        if item.isdigit():
            code = int(item)
            if not 100 <= code <= 599:
                raise ValueError(f"status code {code} is outside 100..599")
            if code not in codes:
                codes.append(code)
            item = "retriable-status-codes"
        elif item not in m.RETRY_CONDITIONS:
            raise ValueError(
                f"{item!r} is not a retry condition (one of {', '.join(m.RETRY_CONDITIONS)}, "
                "or an HTTP status code)"
            )
        if item not in conditions:
            conditions.append(item)
    return tuple(conditions), tuple(codes)


def _seconds(duration: str | None) -> float | None:
    return None if duration is None else parse_duration(duration)


def _cluster_weights(ws: list[s.ClusterWeight]) -> tuple[m.ClusterWeight, ...]:
    return tuple(m.ClusterWeight(w.cluster, w.weight) for w in ws)


def _subset_weights(ws: list[s.SubsetWeight]) -> tuple[m.SubsetWeight, ...]:
    return tuple(m.SubsetWeight(w.subset, w.weight) for w in ws)


def _retries(r: s.Retries | None) -> m.Retries | None:
    if r is None:
        return None
    conditions, codes = parse_retry_on(r.retry_on or DEFAULT_RETRY_ON)
    return m.Retries(r.attempts, _seconds(r.per_try_timeout), conditions, codes)


def _fault(f: s.Fault | None) -> m.Fault | None:
    if f is None:
        return None
    return m.Fault(
        delay=m.FaultDelay(f.delay.percentage.value, parse_duration(f.delay.fixed_delay))
        if f.delay is not None
        else None,
        abort=m.FaultAbort(f.abort.percentage.value, f.abort.http_status)
        if f.abort is not None
        else None,
    )


def _mirror(mirror: s.Mirror | None, percentage: s.Percentage | None) -> m.Mirror | None:
    if mirror is None:
        return None
    return m.Mirror(
        cluster=mirror.cluster or "",
        subset=mirror.subset or "",
        percentage=percentage.value if percentage is not None else 100.0,
    )


def _string_match(sm: s.StringMatch) -> m.StringMatch:
    for kind in m.STRING_MATCH_KINDS:
        value = getattr(sm, kind)
        if value is not None:
            return m.StringMatch(kind, value)
    raise ValueError("string match without a value")  # the schema makes this unreachable


def _match(match: s.Match) -> m.RequestMatch:
    return m.RequestMatch(
        uri=_string_match(match.uri) if match.uri is not None else None,
        headers=tuple(sorted((name, _string_match(v)) for name, v in match.headers.items())),
    )


def _route(r: s.Route) -> m.HttpRoute:
    return m.HttpRoute(
        name=r.name,
        matches=tuple(_match(x) for x in r.match),
        cluster_weights=_cluster_weights(r.cluster_weights),
        subset_weights=_subset_weights(r.subset_weights),
        retries=_retries(r.retries),
        timeout=_seconds(r.timeout),
        fault=_fault(r.fault),
        mirror=_mirror(r.mirror, r.mirror_percentage),
    )


def _pool(p: s.ConnectionPool | None) -> m.ConnectionPool | None:
    if p is None:
        return None
    return m.ConnectionPool(
        max_connections=p.tcp.max_connections if p.tcp is not None else None,
        http1_max_pending_requests=p.http.http1_max_pending_requests if p.http else None,
        http2_max_requests=p.http.http2_max_requests if p.http else None,
    )


def _outlier(o: s.OutlierDetection | None) -> m.OutlierDetection | None:
    if o is None:
        return None
    return m.OutlierDetection(
        consecutive_5xx_errors=o.consecutive_5xx_errors,
        interval=parse_duration(o.interval),
        base_ejection_time=parse_duration(o.base_ejection_time),
        max_ejection_percent=o.max_ejection_percent,
    )


def traffic_policy(
    doc: s.TrafficPolicyDocument, defaults: s.ServiceDefaults | None = None
) -> m.TrafficPolicy:
    spec = doc.spec
    d = defaults or s.ServiceDefaults()
    failover = spec.locality_failover or d.locality_failover
    return m.TrafficPolicy(
        key=ServiceKey.parse_fqdn(spec.host),
        cluster_weights=_cluster_weights(spec.cluster_weights),
        subsets=tuple(m.Subset(x.name, tuple(sorted(x.labels.items()))) for x in spec.subsets),
        subset_weights=_subset_weights(spec.subset_weights),
        locality_failover=m.LocalityFailover(failover.spill_over_threshold)
        if failover is not None
        else None,
        retries=_retries(spec.retries or d.retries),
        timeout=_seconds(spec.timeout or d.timeout),
        connection_pool=_pool(spec.connection_pool or d.connection_pool),
        outlier_detection=_outlier(spec.outlier_detection or d.outlier_detection),
        fault=_fault(spec.fault),
        mirror=_mirror(spec.mirror, spec.mirror_percentage),
        routes=tuple(_route(r) for r in spec.routes),
    )


def authorization_policy(doc: s.AuthorizationPolicyDocument) -> m.AuthorizationPolicy:
    # Istio: a rule matches if any `from` AND any `to` match; inside each, every field must.
    rules = tuple(
        m.AuthorizationRule(
            sources=tuple(
                m.AuthzSource(tuple(f.source.principals), tuple(f.source.not_principals))
                for f in r.from_
            ),
            operations=tuple(
                m.AuthzOperation(
                    ports=tuple(t.operation.ports),
                    not_ports=tuple(t.operation.not_ports),
                    methods=tuple(t.operation.methods),
                    not_methods=tuple(t.operation.not_methods),
                    paths=tuple(t.operation.paths),
                    not_paths=tuple(t.operation.not_paths),
                )
                for t in r.to
            ),
        )
        for r in doc.spec.rules
    )
    return m.AuthorizationPolicy(
        name=doc.metadata.name,
        key=ServiceKey.parse_fqdn(doc.spec.host),
        action=doc.spec.action,
        rules=rules,
    )


def trust_domain(cluster: s.ClusterSpec, spec: s.FederationSpec) -> str:
    return cluster.trust_domain or trust_domain_for(cluster.name, spec.domain)


def federation_json(doc: s.FederationDocument) -> Json:
    """The Federation as the controller reads it from etcd: the document's own field names,
    defaults filled in (every cluster's trust domain, the default transport)."""
    out: Json = doc.model_dump(mode="json", by_alias=True, exclude_none=True)
    for cluster, raw in zip(doc.spec.clusters, out["spec"]["clusters"], strict=True):
        raw["trustDomain"] = trust_domain(cluster, doc.spec)
    return out
