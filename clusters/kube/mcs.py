"""MCS write-back, pure: the merged catalog -> the ServiceImports and ServiceExport conditions a
member cluster should hold, and the writes that get it there.

What a cluster holds, as the MCS API (KEP-1645) and its implementations (Submariner's
Lighthouse, Cilium, GKE) keep it:

* one `ServiceImport` (multicluster.x-k8s.io/v1alpha1) per merged service, in the service's
  namespace, in **every** member cluster: `spec.type: ClusterSetIP`, `spec.ips: [<VIP>]` (left
  out until the controller allocated one), `spec.ports` the merged ports (`name`, `port`,
  `protocol: TCP` and the `appProtocol` our protocol came from: HTTP -> `http`, HTTP2 ->
  `kubernetes.io/h2c`, GRPC -> `grpc`); its `status.clusters` lists the clusters whose exports
  make up the service (`[{cluster: east}, ...]`, as Lighthouse fills it). fedgate labels what it
  creates
  `app.kubernetes.io/managed-by: fedgate`, and deletes only imports carrying that label whose
  service left the merged catalog;
* in `status.conditions` of each of this cluster's `ServiceExport`s that the merge took in:
  `Valid` and `Conflict`, always both, so `kubectl wait --for=condition=Conflict=false` works.
  The controller computes one of them per service (`Valid`/`Merged`, or `Conflict` with the
  reason and the message naming the clusters and ports); the other is filled in: a conflicting
  export is still valid (`Valid` True, reason `Merged`), a valid one has `Conflict` False with
  reason `NoConflict`. `lastTransitionTime` is kept while a condition's status is unchanged.
  An export this cluster's source rejected as a whole (no Service, an ExternalName Service, no
  port that can cross a gateway: `clusters.kube.translate`) and that is therefore not in the
  merge gets `Valid` False, reason `Rejected`, the source's reason as message (and no
  `Conflict`), so `kubectl describe` says why it does not federate.

The writes are server-side applies by field manager `fedgate` (the driver sends them), so
labels, annotations, conditions and fields of other managers stay as they are. `plan` compares
what the cluster holds with the wanted objects and returns only the writes that change
something, so a resync of an unchanged catalog writes nothing. No I/O, no clock (`now` is an
argument), no Kubernetes client: import-linter keeps it pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from clusters.kube.translate import APP_PROTOCOLS, Rejection
from mesh.model import Condition, MergedService, ServicePort

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name)

MANAGER = "fedgate"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_SELECTOR = f"{MANAGED_BY}={MANAGER}"
MCS_API_VERSION = "multicluster.x-k8s.io/v1alpha1"
IMPORTS, EXPORTS = "serviceimports", "serviceexports"
# Our protocol -> the `appProtocol` it is read from (the inverse of the source's table).
APP_PROTOCOL_OF = {ours: app for app, ours in APP_PROTOCOLS.items()}
VALID, CONFLICT = "Valid", "Conflict"
MERGED_VALID = Condition(VALID, True, "Merged")
NO_CONFLICT = Condition(CONFLICT, False, "NoConflict")


@dataclass(frozen=True, slots=True)
class Apply:
    """Server-side apply `body` to `<plural>/<namespace>/<name>[/<subresource>]`."""

    plural: str
    namespace: str
    name: str
    body: Obj
    subresource: str = ""


@dataclass(frozen=True, slots=True)
class Delete:
    plural: str
    namespace: str
    name: str


Write = Apply | Delete


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _port(p: ServicePort) -> Obj:
    out: Obj = {"port": p.port, "protocol": "TCP"}
    if p.name:
        out["name"] = p.name
    app = APP_PROTOCOL_OF.get(p.protocol)
    if app is not None:
        out["appProtocol"] = app
    return out


def service_import(service: MergedService) -> Obj:
    """The ServiceImport (apply configuration) of one merged service."""
    spec: Obj = {"type": "ClusterSetIP", "ports": [_port(p) for p in service.ports]}
    if service.vip:
        spec["ips"] = [service.vip]
    return {
        "apiVersion": MCS_API_VERSION,
        "kind": "ServiceImport",
        "metadata": {
            "name": service.key.name,
            "namespace": service.key.namespace,
            "labels": {MANAGED_BY: MANAGER},
        },
        "spec": spec,
    }


def import_status(service: MergedService) -> Obj:
    """The ServiceImport's status apply configuration: the clusters backing the service."""
    return {
        "apiVersion": MCS_API_VERSION,
        "kind": "ServiceImport",
        "metadata": {"name": service.key.name, "namespace": service.key.namespace},
        "status": {"clusters": [{"cluster": c} for c in service.clusters]},
    }


def export_conditions(service: MergedService) -> tuple[Condition, Condition]:
    """`Valid` and `Conflict` for an export of `service`, from the controller's conditions."""
    by_type = {c.type: c for c in service.conditions}
    return by_type.get(VALID, MERGED_VALID), by_type.get(CONFLICT, NO_CONFLICT)


def _condition(c: Condition, held: Mapping[str, Obj], now: str) -> Obj:
    status = "True" if c.status else "False"
    previous = held.get(c.type) or {}
    since = previous.get("lastTransitionTime") if previous.get("status") == status else None
    return {
        "type": c.type,
        "status": status,
        "reason": c.reason,
        "message": c.message,
        "lastTransitionTime": since or now,
    }


def rejected_exports(rejections: Iterable[Rejection]) -> dict[Key, str]:
    """The exports the source rejected as a whole, with the reason (the first, if several)."""
    out: dict[Key, str] = {}
    for r in rejections:
        if r.kind == "ServiceExport":
            out.setdefault((r.namespace, r.name), r.reason)
    return out


def export_status(export: Mapping[str, Any], service: MergedService | str, now: str) -> Obj:
    """The status apply configuration of this cluster's `export` of `service`, or of an export
    the source rejected (`service` is then the reason)."""
    if isinstance(service, str):
        wanted: tuple[Condition, ...] = (Condition(VALID, False, "Rejected", service),)
    else:
        wanted = export_conditions(service)
    held = {
        str(c.get("type")): c
        for c in (export.get("status") or {}).get("conditions") or []
        if isinstance(c, dict)
    }
    namespace, name = key_of(export)
    return {
        "apiVersion": MCS_API_VERSION,
        "kind": "ServiceExport",
        "metadata": {"name": name, "namespace": namespace},
        "status": {"conditions": [_condition(c, held, now) for c in wanted]},
    }


def _import_holds(existing: Mapping[str, Any], wanted: Obj) -> bool:
    labels = (existing.get("metadata") or {}).get("labels") or {}
    spec = existing.get("spec") or {}
    return labels.get(MANAGED_BY) == MANAGER and all(
        spec.get(k) == wanted["spec"].get(k) for k in ("type", "ips", "ports")
    )


def _export_holds(existing: Mapping[str, Any], wanted: Obj) -> bool:
    held = (existing.get("status") or {}).get("conditions") or []
    return all(c in held for c in wanted["status"]["conditions"])


def plan(
    cluster: str,
    services: Iterable[MergedService],
    imports: Iterable[Mapping[str, Any]],
    exports: Iterable[Mapping[str, Any]],
    now: str,
    rejected: Mapping[Key, str] | None = None,
) -> tuple[Write, ...]:
    """The writes that make `cluster` hold what the merged catalog says.

    `imports` are the cluster's ServiceImports labelled as fedgate's (or all of them: unlabelled
    ones are only ever applied to, never deleted); `exports` its ServiceExports; `now` the
    RFC 3339 time stamped on conditions that change status; `rejected` the exports this
    cluster's source rejected (`rejected_exports`), with the reason. Imports first (each spec,
    then its status), then export conditions, then deletions, each in key order."""
    merged = {(s.key.namespace, s.key.name): s for s in services}
    held_imports = {key_of(i): i for i in imports}
    writes: list[Write] = []
    for key, service in sorted(merged.items()):
        wanted = service_import(service)
        held = held_imports.get(key)
        if held is None or not _import_holds(held, wanted):
            writes.append(Apply(IMPORTS, *key, wanted))
        backing = import_status(service)
        if (
            held is None
            or (held.get("status") or {}).get("clusters") != backing["status"]["clusters"]
        ):
            writes.append(Apply(IMPORTS, *key, backing, "status"))
    for export in sorted(exports, key=key_of):
        key = key_of(export)
        exported = merged.get(key)
        why: MergedService | str | None = None
        if exported is not None and cluster in exported.clusters:
            why = exported
        elif rejected and key in rejected:
            why = rejected[key]
        if why is None or (export.get("metadata") or {}).get("deletionTimestamp"):
            continue  # not (or not yet) merged, not rejected: nothing of ours to say about it
        status = export_status(export, why, now)
        if not _export_holds(export, status):
            writes.append(Apply(EXPORTS, *key, status, "status"))
    for key, held in sorted(held_imports.items()):
        labels = (held.get("metadata") or {}).get("labels") or {}
        if key not in merged and labels.get(MANAGED_BY) == MANAGER:
            writes.append(Delete(IMPORTS, *key))
    return tuple(writes)
