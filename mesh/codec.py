"""JSON codecs for the model, and the tunnel stream header.

The model travels as JSON: agents write it to etcd, the controller serves it inside the config
stream's protobuf envelope (as xDS carries typed resources in `Any`). Decoders face the network or
a shared store, so they validate every field and raise `CodecError` naming what was wrong.

The stream header opens every tunnel stream and every inner (sidecar-to-sidecar) TLS stream:
`FGH1`, a big-endian u16 length, then a JSON object. It is bounded (`MAX_HEADER`) so a peer
cannot make us buffer without limit.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mesh.errors import CodecError, MeshError
from mesh.model import (
    ClusterInfo,
    ClusterWeight,
    Condition,
    Endpoint,
    GatewayAddress,
    MergedService,
    ServiceExport,
    ServicePort,
    Snapshot,
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
    return {"cluster": e.cluster, "address": e.address, "pod": e.pod, "identity": e.identity.uri}


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


def policy_to_json(p: TrafficPolicy) -> Json:
    return {
        "namespace": p.key.namespace,
        "name": p.key.name,
        "clusterWeights": [{"cluster": w.cluster, "weight": w.weight} for w in p.cluster_weights],
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
    )


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


def policy_from_json(o: Mapping[str, Any]) -> TrafficPolicy:
    weights = tuple(
        ClusterWeight(_req(w, "cluster", str), _req(w, "weight", int))
        for w in _req(o, "clusterWeights", list)
    )
    return TrafficPolicy(key=_key(o), cluster_weights=weights)


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
    )


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


@dataclass(frozen=True, slots=True)
class StreamReply:
    """The destination side's answer: 200 and the stream is spliced, anything else and it closes."""

    status: int
    reason: str = ""


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
        }
    )


def encode_reply(r: StreamReply) -> bytes:
    return _frame({"status": r.status, "reason": r.reason})


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
        traceparent=_req(x, "traceparent", str),
    )


def header_from_json(o: Mapping[str, Any]) -> StreamHeader:
    header: StreamHeader = _guard("stream header", _header, o)
    return header


def reply_from_json(o: Mapping[str, Any]) -> StreamReply:
    return StreamReply(status=_req(o, "status", int), reason=_req(o, "reason", str))
