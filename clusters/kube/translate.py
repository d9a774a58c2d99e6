"""Kubernetes objects (as the API server sends them, JSON dicts) -> `mesh.model.ServiceExport`.

Pure: no I/O, no clock, no logging. `translate` takes what the informers hold and returns the
exports plus every object (or part of one) it rejected, with the reason; the driver logs those.

The rules, following the MCS API (KEP-1645) and the Service/EndpointSlice semantics:

* Only a `ServiceExport` makes a service federate. An export whose Service does not exist, is
  `ExternalName`, has no TCP port or is being deleted is rejected (MCS: `Valid=False`).
  `created` is the export's `metadata.creationTimestamp` (the oldest export wins conflicts).
* Ports come from the Service: name (Kubernetes allows one unnamed port: name ""), port, and the
  protocol from `appProtocol`: `http` -> HTTP, `kubernetes.io/h2c` -> HTTP2, `grpc` -> GRPC,
  anything else -> TCP. UDP and SCTP ports cannot cross a gateway tunnel: each is rejected
  alone and the other ports are kept.
* Endpoints come from every EndpointSlice labelled `kubernetes.io/service-name=<service>` in
  the namespace (a service may have several). An endpoint is published only when it may take
  new calls: `ready` (unset means ready) and not `terminating`. A terminating endpoint is simply
  no longer offered; established connections are not cut, because the data plane picks an
  endpoint only when a call starts and never tears down a stream on a catalog change. So
  `mesh.model.Endpoint` needs no new field: "in the catalog" means "may take new calls".
  `serving` is therefore not consulted (kube-proxy uses serving-but-terminating endpoints only
  as a last resort; fedgate would rather fail over to another cluster).
  The first address of an endpoint is used (the API says they are fungible); an address listed
  by two slices (a transient state while slices are rebalanced) is published once.
* Each endpoint's `targetRef` names its Pod: the Pod's `spec.serviceAccountName` (default
  `default`) gives the SPIFFE identity `spiffe://<trust-domain>/ns/<pod ns>/sa/<sa>`, its
  labels give the subsets. An endpoint without a Pod targetRef, whose Pod is unknown, or whose
  Pod's uid differs from the targetRef's (a stale slice after a pod was recreated) is rejected.
* A field of an unexpected shape (custom resources are loosely validated) rejects the smallest
  enclosing part (port, endpoint, slice or export) with the error; translation never raises.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mesh.errors import InvalidNameError
from mesh.model import Endpoint, ServiceExport, ServicePort
from mesh.naming import ServiceKey, SpiffeId

Obj = Mapping[str, Any]
Key = tuple[str, str]  # (namespace, name)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# What reading a field of an unexpected shape raises: such an object (or part) is rejected.
MALFORMED = (AttributeError, TypeError, KeyError, ValueError, IndexError)
APP_PROTOCOLS = {"http": "HTTP", "kubernetes.io/h2c": "HTTP2", "grpc": "GRPC"}


@dataclass(frozen=True, order=True, slots=True)
class Rejection:
    """An object (or one part of it: a port, an endpoint) left out of the catalog, and why."""

    kind: str
    namespace: str
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class ClusterObjects:
    """The informers' caches at one moment, keyed by (namespace, name)."""

    exports: Mapping[Key, Obj]
    services: Mapping[Key, Obj]
    slices: Mapping[Key, Obj]
    pods: Mapping[Key, Obj]


def key_of(obj: Obj) -> Key:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return ("", "")
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def protocol_for(port: Obj) -> str:
    return APP_PROTOCOLS.get(str(port.get("appProtocol") or ""), "TCP")


def parse_timestamp(value: object) -> float:
    """RFC 3339 (`metav1.Time`, e.g. `2026-11-30T09:14:00Z`) -> seconds since the epoch."""
    if not isinstance(value, str):
        raise ValueError(f"creationTimestamp {value!r} is not a timestamp")
    stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        raise ValueError(f"creationTimestamp {value!r} has no time zone")
    return stamp.timestamp()


def service_ports(service: Obj, rejected: list[Rejection]) -> tuple[ServicePort, ...]:
    ns, name = key_of(service)
    ports = []
    for i, p in enumerate((service.get("spec") or {}).get("ports") or []):
        label = f"port {p.get('name') or i!s}"
        if (p.get("protocol") or "TCP") != "TCP":
            reason = f"{label}: protocol {p.get('protocol')} cannot be federated, port skipped"
            rejected.append(Rejection("Service", ns, name, reason))
            continue
        try:
            ports.append(ServicePort(str(p.get("name") or ""), int(p["port"]), protocol_for(p)))
        except MALFORMED as e:
            rejected.append(Rejection("Service", ns, name, f"{label}: {e!r}, port skipped"))
    return tuple(ports)


def _ready(endpoint: Obj) -> bool:
    conditions = endpoint.get("conditions") or {}
    # EndpointConditions: an unset `ready` means ready; an unset `terminating` means not.
    return conditions.get("ready") is not False and conditions.get("terminating") is not True


def slices_by_service(slices: Mapping[Key, Obj]) -> dict[Key, list[tuple[str, Obj]]]:
    """(namespace, service) -> its slices as (name, slice), in name order."""
    index: dict[Key, list[tuple[str, Obj]]] = {}
    for (ns, name), sl in sorted(slices.items()):
        try:
            service = sl["metadata"]["labels"][SERVICE_NAME_LABEL]
        except MALFORMED:
            continue  # no (readable) service-name label: not a Service's slice
        if service and isinstance(service, str):
            index.setdefault((ns, str(service)), []).append((name, sl))
    return index


def _endpoints_of(
    objs: ClusterObjects,
    slices: list[tuple[str, Obj]],
    ns: str,
    cluster: str,
    trust_domain: str,
    rejected: list[Rejection],
) -> Iterator[Endpoint]:
    for slice_name, sl in slices:
        if sl.get("addressType") not in ("IPv4", "IPv6"):
            reason = f"addressType {sl.get('addressType')!r} is not an IP family"
            rejected.append(Rejection("EndpointSlice", ns, slice_name, reason))
            continue
        endpoints = sl.get("endpoints") or []
        if not isinstance(endpoints, list):
            reason = f"malformed: endpoints is a {type(endpoints).__name__}"
            rejected.append(Rejection("EndpointSlice", ns, slice_name, reason))
            continue
        for ep in endpoints:
            try:
                if not _ready(ep):
                    continue
                found = _endpoint(objs, ep, ns, cluster, trust_domain)
            except MALFORMED as e:
                found = f"malformed endpoint: {e!r}"
            if isinstance(found, str):
                rejected.append(Rejection("EndpointSlice", ns, slice_name, found))
            else:
                yield found


def _endpoint(objs: ClusterObjects, ep: Obj, ns: str, cluster: str, td: str) -> Endpoint | str:
    """The endpoint, or the reason it is rejected."""
    addresses = ep.get("addresses") or []
    where = f"endpoint {addresses[0] if addresses else '(no address)'}"
    try:
        address = str(ipaddress.ip_address(addresses[0]))
    except (IndexError, ValueError):
        return f"{where}: no valid IP address"
    ref = ep.get("targetRef") or {}
    if ref.get("kind") != "Pod" or not ref.get("name"):
        return f"{where}: targetRef is not a Pod, so it has no workload identity"
    pod_key = (str(ref.get("namespace") or ns), str(ref["name"]))
    pod = objs.pods.get(pod_key)
    if pod is None:
        return f"{where}: pod {pod_key[0]}/{pod_key[1]} not found"
    uid = (pod.get("metadata") or {}).get("uid")
    if ref.get("uid") and uid != ref["uid"]:
        return f"{where}: pod {pod_key[1]} has uid {uid}, the slice names {ref['uid']} (stale)"
    sa = (pod.get("spec") or {}).get("serviceAccountName") or "default"
    try:
        identity = SpiffeId(td, pod_key[0], sa)
    except InvalidNameError as e:
        return f"{where}: {e}"
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return Endpoint(
        cluster=cluster,
        address=address,
        pod=pod_key[1],
        identity=identity,
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
    )


def _export(
    objs: ClusterObjects,
    slices: Mapping[Key, list[tuple[str, Obj]]],
    export: Obj,
    cluster: str,
    trust_domain: str,
    rejected: list[Rejection],
) -> ServiceExport | None:
    ns, name = key_of(export)

    def reject(reason: str) -> None:
        rejected.append(Rejection("ServiceExport", ns, name, reason))

    if (export.get("metadata") or {}).get("deletionTimestamp"):
        return None  # being deleted: withdrawn now, not when its finalizers are done
    try:
        key = ServiceKey(ns, name)
        created = parse_timestamp((export.get("metadata") or {}).get("creationTimestamp"))
    except (InvalidNameError, ValueError) as e:
        reject(str(e))
        return None
    service = objs.services.get((ns, name))
    if service is None:
        reject(f"no Service {ns}/{name} to export")
        return None
    if (service.get("spec") or {}).get("type") == "ExternalName":
        reject("an ExternalName Service cannot be exported")
        return None
    ports = service_ports(service, rejected)
    if not ports:
        reject(f"Service {ns}/{name} has no port that can be federated")
        return None
    unique: dict[str, Endpoint] = {}
    own = slices.get((ns, name), [])
    for ep in _endpoints_of(objs, own, ns, cluster, trust_domain, rejected):
        unique.setdefault(ep.address, ep)
    return ServiceExport(
        cluster=cluster,
        key=key,
        ports=ports,
        created=created,
        endpoints=tuple(sorted(unique.values())),
    )


def translate(
    objs: ClusterObjects, cluster: str, trust_domain: str
) -> tuple[tuple[ServiceExport, ...], tuple[Rejection, ...]]:
    """The cluster's exports, sorted by key (endpoints by address), and the rejections."""
    rejected: list[Rejection] = []
    exports = []
    slices = slices_by_service(objs.slices)
    for _, export in sorted(objs.exports.items()):
        try:
            x = _export(objs, slices, export, cluster, trust_domain, rejected)
        except MALFORMED as e:
            ns, name = key_of(export)
            rejected.append(Rejection("ServiceExport", ns, name, f"malformed: {e!r}"))
            continue
        if x is not None:
            exports.append(x)
    return tuple(sorted(exports, key=lambda x: x.key)), tuple(sorted(set(rejected)))
