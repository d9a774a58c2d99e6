"""JSON codecs for the model, and the tunnel stream header.

The model travels as JSON: agents write it to etcd, the controller serves it inside the config
stream's protobuf envelope (as xDS carries typed resources in `Any`). Decoders face the network or
a shared store, so they validate every field and raise `CodecError` naming what was wrong.

The stream header opens every tunnel stream and every inner (sidecar-to-sidecar) TLS stream:
`FGH1`, a big-endian u16 length, then a JSON object. It is bounded (`MAX_HEADER`) so a peer
cannot make us buffer without limit.

Over the 450-line aim: one decoder per model type, all built on the field readers at the top;
splitting by type would scatter the one place where what crosses the wire is checked.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mesh import tracecontext
from mesh.connect import check_labels
from mesh.errors import CodecError, MeshError
from mesh.model import (
    AuthorizationPolicy,
    AuthorizationRule,
    AuthzOperation,
    AuthzSource,
    ClusterInfo,
    ClusterWeight,
    Condition,
    ConnectionPool,
    Endpoint,
    Fault,
    FaultAbort,
    FaultDelay,
    GatewayAddress,
    HttpRoute,
    LocalityFailover,
    MergedService,
    Mirror,
    OutlierDetection,
    RequestMatch,
    Retries,
    ServiceExport,
    ServicePort,
    Snapshot,
    StringMatch,
    Subset,
    SubsetWeight,
    TrafficPolicy,
)
from mesh.naming import ServiceKey, SpiffeId

Json = dict[str, Any]


def _req(obj: Mapping[str, Any], name: str, kind: type) -> Any:
    try:
        value = obj[name]
    except (KeyError, TypeError) as e:
        raise CodecError(f"missing field {name!r}") from e
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CodecError(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _key(obj: Mapping[str, Any]) -> ServiceKey:
    return ServiceKey(_req(obj, "namespace", str), _req(obj, "name", str))


# --- encoders ---------------------------------------------------------------------------------


def port_to_json(p: ServicePort) -> Json:
    return {"name": p.name, "port": p.port, "protocol": p.protocol}


def endpoint_to_json(e: Endpoint) -> Json:
    out: Json = {"cluster": e.cluster, "address": e.address, "pod": e.pod}
    out["identity"] = e.identity.uri
    if e.labels:  # absent when empty, so unlabelled catalogs keep their versions
        out["labels"] = dict(e.labels)
    return out


def gateway_to_json(g: GatewayAddress) -> Json:
    return {
        "tunnelHost": g.tunnel_host,
        "tunnelPort": g.tunnel_port,
        "egressHost": g.egress_host,
        "egressPort": g.egress_port,
        "transport": g.transport,
    }


def cluster_to_json(c: ClusterInfo) -> Json:
    return {
        "name": c.name,
        "trustDomain": c.trust_domain,
        "gateway": gateway_to_json(c.gateway) if c.gateway else None,
        "roots": list(c.roots),
        "network": c.network,
        "region": c.region,
        "zone": c.zone,
    }


def export_to_json(x: ServiceExport) -> Json:
    return {
        "cluster": x.cluster,
        "namespace": x.key.namespace,
        "name": x.key.name,
        "ports": [port_to_json(p) for p in x.ports],
        "created": x.created,
        "endpoints": [endpoint_to_json(e) for e in x.endpoints],
    }


# TrafficPolicy and AuthorizationPolicy use the GitOps documents' field names; durations are
# seconds (numbers), unset fields are left out so a policy with weights only stays small.


def _cluster_weights_to_json(ws: tuple[ClusterWeight, ...]) -> list[Json]:
    return [{"cluster": w.cluster, "weight": w.weight} for w in ws]


def _retries_to_json(r: Retries) -> Json:
    out: Json = {"attempts": r.attempts, "retryOn": list(r.retry_on)}
    if r.per_try_timeout is not None:
        out["perTryTimeout"] = r.per_try_timeout
    if r.retriable_status_codes:
        out["retriableStatusCodes"] = list(r.retriable_status_codes)
    return out


def _fault_to_json(f: Fault) -> Json:
    out: Json = {}
    if f.delay is not None:
        out["delay"] = {"percentage": f.delay.percentage, "fixedDelay": f.delay.fixed_delay}
    if f.abort is not None:
        out["abort"] = {"percentage": f.abort.percentage, "httpStatus": f.abort.http_status}
    return out


def _mirror_to_json(m: Mirror) -> Json:
    return {"cluster": m.cluster, "subset": m.subset, "percentage": m.percentage}


def _string_match_to_json(m: StringMatch) -> Json:
    return {m.kind: m.value}


def _match_to_json(m: RequestMatch) -> Json:
    out: Json = {"headers": {name: _string_match_to_json(v) for name, v in m.headers}}
    if m.uri is not None:
        out["uri"] = _string_match_to_json(m.uri)
    return out


def _overrides_to_json(
    out: Json,
    subset_weights: tuple[SubsetWeight, ...],
    retries: Retries | None,
    timeout: float | None,
    fault: Fault | None,
    mirror: Mirror | None,
) -> Json:
    if subset_weights:
        out["subsetWeights"] = [{"subset": w.subset, "weight": w.weight} for w in subset_weights]
    if retries is not None:
        out["retries"] = _retries_to_json(retries)
    if timeout is not None:
        out["timeout"] = timeout
    if fault is not None:
        out["fault"] = _fault_to_json(fault)
    if mirror is not None:
        out["mirror"] = _mirror_to_json(mirror)
    return out


def _route_to_json(r: HttpRoute) -> Json:
    out: Json = {
        "name": r.name,
        "match": [_match_to_json(m) for m in r.matches],
        "clusterWeights": _cluster_weights_to_json(r.cluster_weights),
    }
    return _overrides_to_json(out, r.subset_weights, r.retries, r.timeout, r.fault, r.mirror)


def policy_to_json(p: TrafficPolicy) -> Json:
    out: Json = {
        "namespace": p.key.namespace,
        "name": p.key.name,
        "clusterWeights": _cluster_weights_to_json(p.cluster_weights),
    }
    if p.subsets:
        out["subsets"] = [{"name": s.name, "labels": dict(s.labels)} for s in p.subsets]
    if p.locality_failover is not None:
        out["localityFailover"] = {"spillOverThreshold": p.locality_failover.spill_over_threshold}
    if p.connection_pool is not None:
        cp = p.connection_pool
        pool = {
            "maxConnections": cp.max_connections,
            "http1MaxPendingRequests": cp.http1_max_pending_requests,
            "http2MaxRequests": cp.http2_max_requests,
        }
        out["connectionPool"] = {k: v for k, v in pool.items() if v is not None}
    if p.outlier_detection is not None:
        od = p.outlier_detection
        out["outlierDetection"] = {
            "consecutive5xxErrors": od.consecutive_5xx_errors,
            "interval": od.interval,
            "baseEjectionTime": od.base_ejection_time,
            "maxEjectionPercent": od.max_ejection_percent,
        }
    if p.routes:
        out["routes"] = [_route_to_json(r) for r in p.routes]
    return _overrides_to_json(out, p.subset_weights, p.retries, p.timeout, p.fault, p.mirror)


_SOURCE_FIELDS = (("principals", "principals"), ("notPrincipals", "not_principals"))
_OPERATION_FIELDS = (
    ("ports", "ports"),
    ("notPorts", "not_ports"),
    ("methods", "methods"),
    ("notMethods", "not_methods"),
    ("paths", "paths"),
    ("notPaths", "not_paths"),
)


def _fields_to_json(obj: object, fields: tuple[tuple[str, str], ...]) -> Json:
    return {name: list(getattr(obj, attr)) for name, attr in fields if getattr(obj, attr)}


def authorization_to_json(a: AuthorizationPolicy) -> Json:
    return {
        "namespace": a.key.namespace,
        "service": a.key.name,
        "name": a.name,
        "action": a.action,
        "rules": [
            {
                "from": [_fields_to_json(s, _SOURCE_FIELDS) for s in r.sources],
                "to": [_fields_to_json(o, _OPERATION_FIELDS) for o in r.operations],
            }
            for r in a.rules
        ],
    }


def service_to_json(s: MergedService) -> Json:
    return {
        "namespace": s.key.namespace,
        "name": s.key.name,
        "vip": s.vip,
        "ports": [port_to_json(p) for p in s.ports],
        "clusters": list(s.clusters),
        "endpoints": [endpoint_to_json(e) for e in s.endpoints],
        "conditions": [
            {"type": c.type, "status": c.status, "reason": c.reason, "message": c.message}
            for c in s.conditions
        ],
    }


def snapshot_to_json(s: Snapshot) -> Json:
    return {
        "version": s.version,
        "clusters": [cluster_to_json(c) for c in s.clusters],
        "services": [service_to_json(x) for x in s.services],
        "policies": [policy_to_json(p) for p in s.policies],
        "trustBundle": {td: list(roots) for td, roots in sorted(s.trust_bundle.items())},
        # absent when empty, like `denied`: configs without it keep their versions
        **(
            {"authorization": [authorization_to_json(a) for a in s.authorization]}
            if s.authorization
            else {}
        ),
        **({"denied": list(s.denied)} if s.denied else {}),  # absent when empty (older peers)
    }


def dumps(obj: Json) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# --- decoders ---------------------------------------------------------------------------------


def _guard(what: str, fn: Any, obj: Any) -> Any:
    """Run a decoder, turning model validation errors into CodecError naming `what`."""
    try:
        return fn(obj)
    except CodecError as e:
        raise CodecError(f"{what}: {e}") from e
    except (MeshError, ValueError, TypeError, AttributeError) as e:
        raise CodecError(f"{what}: {e}") from e


def port_from_json(o: Mapping[str, Any]) -> ServicePort:
    return ServicePort(_req(o, "name", str), _req(o, "port", int), _req(o, "protocol", str))


def endpoint_from_json(o: Mapping[str, Any]) -> Endpoint:
    return Endpoint(
        cluster=_req(o, "cluster", str),
        address=_req(o, "address", str),
        pod=_req(o, "pod", str),
        identity=SpiffeId.parse(_req(o, "identity", str)),
        labels=_labels(o.get("labels", {})),
    )


def _labels(o: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(o, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in o.items()
    ):
        raise CodecError("field 'labels' must map strings to strings")
    return tuple(sorted(o.items()))


def gateway_from_json(o: Mapping[str, Any]) -> GatewayAddress:
    return GatewayAddress(
        tunnel_host=_req(o, "tunnelHost", str),
        tunnel_port=_req(o, "tunnelPort", int),
        egress_host=_req(o, "egressHost", str),
        egress_port=_req(o, "egressPort", int),
        transport=_req(o, "transport", str),
    )


def cluster_from_json(o: Mapping[str, Any]) -> ClusterInfo:
    gw = o.get("gateway")
    return ClusterInfo(
        name=_req(o, "name", str),
        trust_domain=_req(o, "trustDomain", str),
        gateway=_guard("gateway", gateway_from_json, gw) if gw is not None else None,
        roots=tuple(str(r) for r in _req(o, "roots", list)),
        network=str(o.get("network", "")),
        region=str(o.get("region", "")),
        zone=str(o.get("zone", "")),
    )


def export_from_json(o: Mapping[str, Any]) -> ServiceExport:
    created = _req(o, "created", (int, float))  # type: ignore[arg-type]
    return ServiceExport(
        cluster=_req(o, "cluster", str),
        key=_key(o),
        ports=tuple(_guard("port", port_from_json, p) for p in _req(o, "ports", list)),
        created=float(created),
        endpoints=tuple(
            _guard("endpoint", endpoint_from_json, e) for e in _req(o, "endpoints", list)
        ),
    )


def _opt(o: Mapping[str, Any], name: str, kind: type) -> Any:
    """An optional field: None when absent or null, else checked like `_req`."""
    return None if o.get(name) is None else _req(o, name, kind)


def _number(o: Mapping[str, Any], name: str) -> float:
    return float(_req(o, name, (int, float)))  # type: ignore[arg-type]


def _opt_number(o: Mapping[str, Any], name: str) -> float | None:
    return None if o.get(name) is None else _number(o, name)


def _cluster_weights(items: list[Any]) -> tuple[ClusterWeight, ...]:
    return tuple(ClusterWeight(_req(w, "cluster", str), _req(w, "weight", int)) for w in items)


def _retries(o: Mapping[str, Any]) -> Retries:
    return Retries(
        attempts=_req(o, "attempts", int),
        per_try_timeout=_opt_number(o, "perTryTimeout"),
        retry_on=tuple(str(c) for c in _req(o, "retryOn", list)),
        retriable_status_codes=tuple(int(c) for c in o.get("retriableStatusCodes", [])),
    )


def _fault(o: Mapping[str, Any]) -> Fault:
    delay = _opt(o, "delay", dict)
    abort = _opt(o, "abort", dict)
    return Fault(
        delay=FaultDelay(_number(delay, "percentage"), _number(delay, "fixedDelay"))
        if delay is not None
        else None,
        abort=FaultAbort(_number(abort, "percentage"), _req(abort, "httpStatus", int))
        if abort is not None
        else None,
    )


def _mirror(o: Mapping[str, Any]) -> Mirror:
    return Mirror(_req(o, "cluster", str), _req(o, "subset", str), _number(o, "percentage"))


def _string_match(o: Mapping[str, Any]) -> StringMatch:
    if not isinstance(o, Mapping) or len(o) != 1:
        raise CodecError("a string match must have exactly one of exact, prefix, regex")
    ((kind, value),) = o.items()
    if not isinstance(value, str):
        raise CodecError(f"string match {kind!r} must be a string")
    return StringMatch(str(kind), value)


def _request_match(o: Mapping[str, Any]) -> RequestMatch:
    uri = _opt(o, "uri", dict)
    return RequestMatch(
        uri=_string_match(uri) if uri is not None else None,
        headers=tuple(
            (str(name), _string_match(m)) for name, m in _req(o, "headers", dict).items()
        ),
    )


def _overrides(o: Mapping[str, Any]) -> dict[str, Any]:
    retries = _opt(o, "retries", dict)
    fault = _opt(o, "fault", dict)
    mirror = _opt(o, "mirror", dict)
    return {
        "cluster_weights": _cluster_weights(_req(o, "clusterWeights", list)),
        "subset_weights": tuple(
            SubsetWeight(_req(w, "subset", str), _req(w, "weight", int))
            for w in o.get("subsetWeights", [])
        ),
        "retries": _guard("retries", _retries, retries) if retries is not None else None,
        "timeout": _opt_number(o, "timeout"),
        "fault": _guard("fault", _fault, fault) if fault is not None else None,
        "mirror": _guard("mirror", _mirror, mirror) if mirror is not None else None,
    }


def _route(o: Mapping[str, Any]) -> HttpRoute:
    matches = tuple(_guard("match", _request_match, m) for m in _req(o, "match", list))
    return HttpRoute(name=_req(o, "name", str), matches=matches, **_overrides(o))


def policy_from_json(o: Mapping[str, Any]) -> TrafficPolicy:
    failover = _opt(o, "localityFailover", dict)
    pool = _opt(o, "connectionPool", dict)
    outlier = _opt(o, "outlierDetection", dict)
    return TrafficPolicy(
        key=_key(o),
        subsets=tuple(
            Subset(
                _req(s, "name", str),
                tuple(sorted((str(k), str(v)) for k, v in _req(s, "labels", dict).items())),
            )
            for s in o.get("subsets", [])
        ),
        locality_failover=LocalityFailover(_number(failover, "spillOverThreshold"))
        if failover is not None
        else None,
        connection_pool=ConnectionPool(
            _opt(pool, "maxConnections", int),
            _opt(pool, "http1MaxPendingRequests", int),
            _opt(pool, "http2MaxRequests", int),
        )
        if pool is not None
        else None,
        outlier_detection=OutlierDetection(
            _req(outlier, "consecutive5xxErrors", int),
            _number(outlier, "interval"),
            _number(outlier, "baseEjectionTime"),
            _number(outlier, "maxEjectionPercent"),
        )
        if outlier is not None
        else None,
        routes=tuple(_guard("route", _route, r) for r in o.get("routes", [])),
        **_overrides(o),
    )


def _strings(o: Mapping[str, Any], name: str) -> tuple[str, ...]:
    return tuple(str(v) for v in _opt(o, name, list) or ())


def _ports(o: Mapping[str, Any], name: str) -> tuple[int, ...]:
    return tuple(ServicePort("p", int(n)).port for n in _opt(o, name, list) or ())


def _rule(r: Mapping[str, Any]) -> AuthorizationRule:
    if "from" not in r and "to" not in r and ("principals" in r or "ports" in r):
        # The format before L7 rules: one list of principals and one of ports.
        sources = (AuthzSource(_strings(r, "principals")),) if r.get("principals") else ()
        operations = (AuthzOperation(_ports(r, "ports")),) if r.get("ports") else ()
        return AuthorizationRule(sources, operations)
    return AuthorizationRule(
        tuple(
            AuthzSource(_strings(s, "principals"), _strings(s, "notPrincipals"))
            for s in _opt(r, "from", list) or ()
        ),
        tuple(
            AuthzOperation(
                _ports(t, "ports"),
                _ports(t, "notPorts"),
                _strings(t, "methods"),
                _strings(t, "notMethods"),
                _strings(t, "paths"),
                _strings(t, "notPaths"),
            )
            for t in _opt(r, "to", list) or ()
        ),
    )


def authorization_from_json(o: Mapping[str, Any]) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        name=_req(o, "name", str),
        key=ServiceKey(_req(o, "namespace", str), _req(o, "service", str)),
        action=_req(o, "action", str),
        rules=tuple(_guard("rule", _rule, r) for r in _req(o, "rules", list)),
    )


def service_from_json(o: Mapping[str, Any]) -> MergedService:
    return MergedService(
        key=_key(o),
        vip=_req(o, "vip", str),
        ports=tuple(_guard("port", port_from_json, p) for p in _req(o, "ports", list)),
        clusters=tuple(str(c) for c in _req(o, "clusters", list)),
        endpoints=tuple(
            _guard("endpoint", endpoint_from_json, e) for e in _req(o, "endpoints", list)
        ),
        conditions=tuple(
            Condition(
                _req(c, "type", str),
                _req(c, "status", bool),
                _req(c, "reason", str),
                str(c.get("message", "")),
            )
            for c in o.get("conditions", [])
        ),
    )


def snapshot_from_json(o: Mapping[str, Any]) -> Snapshot:
    bundle = _req(o, "trustBundle", dict)
    return Snapshot(
        version=_req(o, "version", str),
        clusters=tuple(_guard("cluster", cluster_from_json, c) for c in _req(o, "clusters", list)),
        services=tuple(_guard("service", service_from_json, s) for s in _req(o, "services", list)),
        policies=tuple(_guard("policy", policy_from_json, p) for p in _req(o, "policies", list)),
        trust_bundle={str(td): tuple(str(r) for r in roots) for td, roots in bundle.items()},
        authorization=tuple(
            _guard("authorization", authorization_from_json, a) for a in o.get("authorization", [])
        ),
        denied=_denied(o.get("denied", [])),
    )


def _denied(items: Any) -> tuple[str, ...]:
    """Deny-list entries: `spiffe://<td>` or a full SPIFFE ID (checked again by ca/)."""
    if not isinstance(items, list):
        raise CodecError("field 'denied' must be list")
    out = []
    for item in items:
        if not isinstance(item, str) or not item.startswith("spiffe://"):
            raise CodecError(f"deny entry {item!r} is not a spiffe:// URI")
        domain, _, path = item[len("spiffe://") :].partition("/")
        if path:
            SpiffeId.parse(item)
        elif not domain:
            raise CodecError(f"deny entry {item!r} names no trust domain")
        out.append(item)
    return tuple(sorted(set(out)))


def loads(data: bytes | str, what: str = "document") -> Json:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CodecError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise CodecError(f"{what} must be a JSON object")
    return obj


def decode(data: bytes | str, fn: Any, what: str) -> Any:
    """`decode(raw, snapshot_from_json, "snapshot")`: parse and validate in one step."""
    return _guard(what, fn, loads(data, what))


# --- stream header ----------------------------------------------------------------------------

HEADER_MAGIC = b"FGH1"
MAX_HEADER = 4096
_PREFIX = struct.Struct("!4sH")


@dataclass(frozen=True, slots=True)
class StreamHeader:
    """Names a stream's destination. Sent first on every tunnel and inner stream."""

    service: ServiceKey
    port: int
    cluster: str = ""
    traceparent: str = ""
    labels: tuple[tuple[str, str], ...] = ()  # a subset's labels (mesh.connect): pick among those


@dataclass(frozen=True, slots=True)
class StreamReply:
    """The destination side's answer: 200 and the stream is spliced, anything else and it closes."""

    status: int
    reason: str = ""
    # The answering hop's span, so the caller can parent the next hop's span on it (the
    # inner stream's destination sidecar under the ingress gateway). Optional on the wire.
    traceparent: str = ""


def _frame(obj: Json) -> bytes:
    body = dumps(obj)
    if len(body) > MAX_HEADER:
        raise CodecError(f"stream header of {len(body)} bytes exceeds {MAX_HEADER}")
    return _PREFIX.pack(HEADER_MAGIC, len(body)) + body


def encode_header(h: StreamHeader) -> bytes:
    return _frame(
        {
            "ns": h.service.namespace,
            "svc": h.service.name,
            "port": h.port,
            "cluster": h.cluster,
            "traceparent": h.traceparent,
            # absent when empty: gateways that predate subsets read the header unchanged
            **({"labels": dict(h.labels)} if h.labels else {}),
        }
    )


def encode_reply(r: StreamReply) -> bytes:
    obj: Json = {"status": r.status, "reason": r.reason}
    if r.traceparent:  # absent when empty: older decoders never see the key
        obj["traceparent"] = r.traceparent
    return _frame(obj)


def split_frame(buf: bytes) -> tuple[Json, bytes] | None:
    """Return (object, rest) once a whole frame is in `buf`, None if more bytes are needed."""
    if len(buf) < _PREFIX.size:
        if not HEADER_MAGIC.startswith(buf[:4]):
            raise CodecError("stream does not start with the FGH1 header magic")
        return None
    magic, length = _PREFIX.unpack_from(buf)
    if magic != HEADER_MAGIC:
        raise CodecError("stream does not start with the FGH1 header magic")
    if length > MAX_HEADER:
        raise CodecError(f"stream header of {length} bytes exceeds {MAX_HEADER}")
    end = _PREFIX.size + length
    if len(buf) < end:
        return None
    return loads(buf[_PREFIX.size : end], "stream header"), buf[end:]


def _header(x: Mapping[str, Any]) -> StreamHeader:
    return StreamHeader(
        service=ServiceKey(_req(x, "ns", str), _req(x, "svc", str)),
        port=ServicePort("p", _req(x, "port", int)).port,
        cluster=_req(x, "cluster", str),
        traceparent=_traceparent(x),
        labels=check_labels(_labels(x.get("labels", {}))),
    )


def _traceparent(x: Mapping[str, Any]) -> str:
    """Optional (older peers), a string if present; an invalid value is dropped, not refused
    (W3C Trace Context 3.2.2: restart the trace), so it never costs a call."""
    value = x.get("traceparent", "")
    if not isinstance(value, str):
        raise CodecError("field 'traceparent' must be a string")
    return value if tracecontext.parse(value) is not None else ""


def header_from_json(o: Mapping[str, Any]) -> StreamHeader:
    header: StreamHeader = _guard("stream header", _header, o)
    return header


def reply_from_json(o: Mapping[str, Any]) -> StreamReply:
    return StreamReply(
        status=_req(o, "status", int), reason=_req(o, "reason", str), traceparent=_traceparent(o)
    )
