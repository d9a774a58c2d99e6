"""What the leader writes back under /fedgate/status/ and /fedgate/leader, pure: records, codecs.

- `/fedgate/status/clusters/<cluster>`: the cluster's liveness record (federation.liveness),
  so every replica and a newly elected leader damp flaps the same way, and operators see why a
  cluster is out of routing.
- `/fedgate/status/services/<ns>/<svc>`: the ServiceImport's status: VIP, ports, endpoints per
  cluster, and the MCS conditions (`Valid`, or `Conflict` on every export with the reason).
- `/fedgate/status/config`: the config version served, the commit it came from, the leader.
- `/fedgate/leader`: who leads (`LeaderRecord`), written by federation.leader with its lease.

Values are JSON (mesh.codec.dumps: sorted keys, compact) so an unchanged record encodes to the
same bytes and `changed_keys` can skip it: the leader writes only what changed. This module does
no I/O; federation.owned writes, fedgate.cli_status reads, and agents read the service records
back (federation.merged_feed) to write ServiceImports and ServiceExport conditions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from federation import keys
from federation.liveness import STATES, ClusterLiveness
from mesh.codec import dumps, loads, port_from_json, port_to_json
from mesh.errors import CodecError, MeshError
from mesh.model import Condition, MergedService, ServiceExport
from mesh.naming import ServiceKey

Json = dict[str, Any]


def _condition_json(c: Condition) -> Json:
    return {"type": c.type, "status": c.status, "reason": c.reason, "message": c.message}


# --- cluster liveness -------------------------------------------------------------------------


def liveness_to_json(r: ClusterLiveness) -> Json:
    return {
        "cluster": r.cluster,
        "state": r.state,
        "merit": round(r.merit, 3),
        "updated": r.updated,
        "since": r.since,
        "losses": r.losses,
    }


def liveness_from_json(o: Mapping[str, Any]) -> ClusterLiveness:
    try:
        record = ClusterLiveness(
            cluster=str(o["cluster"]),
            state=str(o["state"]),
            merit=float(o["merit"]),
            updated=float(o["updated"]),
            since=float(o["since"]),
            losses=int(o.get("losses", 0)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"cluster liveness record: {e}") from e
    if record.state not in STATES:
        raise CodecError(f"cluster liveness state {record.state!r} is not one of {STATES}")
    return record


def liveness_entries(records: Iterable[ClusterLiveness]) -> dict[str, bytes]:
    return {keys.cluster_status_key(r.cluster): dumps(liveness_to_json(r)) for r in records}


# --- services ---------------------------------------------------------------------------------


def service_status_json(service: MergedService, exports: Iterable[ServiceExport]) -> Json:
    """The ServiceImport status: the merged view plus each live export's conditions (MCS)."""
    per_cluster: dict[str, int] = dict.fromkeys(service.clusters, 0)
    for e in service.endpoints:
        per_cluster[e.cluster] = per_cluster.get(e.cluster, 0) + 1
    conditions = [_condition_json(c) for c in service.conditions]
    return {
        "namespace": service.key.namespace,
        "name": service.key.name,
        "vip": service.vip,
        "ports": [port_to_json(p) for p in service.ports],
        "endpoints": per_cluster,
        "conditions": conditions,
        "exports": {
            x.cluster: {"created": x.created, "conditions": conditions}
            for x in sorted(exports, key=lambda x: x.cluster)
            if x.cluster in per_cluster
        },
    }


def service_status_from_json(o: Mapping[str, Any]) -> MergedService:
    """The merged service a status record describes, as agents read it back to write
    ServiceImports and export conditions: VIP, ports, clusters and conditions (endpoints are
    only counted in the record, so `endpoints` is empty). Raises CodecError."""
    try:
        per_cluster = o["endpoints"]
        if not isinstance(per_cluster, dict):
            raise TypeError("endpoints is not an object")
        return MergedService(
            key=ServiceKey(str(o["namespace"]), str(o["name"])),
            vip=str(o["vip"]),
            ports=tuple(port_from_json(p) for p in o["ports"]),
            clusters=tuple(sorted(str(c) for c in per_cluster)),
            endpoints=(),
            conditions=tuple(
                Condition(str(c["type"]), bool(c["status"]), str(c["reason"]), str(c["message"]))
                for c in o["conditions"]
            ),
        )
    except (KeyError, TypeError, ValueError, MeshError) as e:
        raise CodecError(f"service status record: {e}") from e


def service_entry(service: MergedService, exports: Iterable[ServiceExport]) -> tuple[str, bytes]:
    return keys.service_status_key(service.key), dumps(service_status_json(service, exports))


# --- config and leader ------------------------------------------------------------------------


def config_status_json(
    version: str,
    commit: str,
    leader: str,
    revision: int,
    clusters: Iterable[str],
    services: int,
    endpoints: int,
    updated: float,
    held: Mapping[str, Any] | None = None,
) -> Json:
    """`held`: the collapse guard holds this (last good) config (federation.collapse)."""
    return {
        "version": version,
        "commit": commit,
        "leader": leader,
        "revision": revision,
        "clusters": sorted(clusters),
        "services": services,
        "endpoints": endpoints,
        "updated": updated,
        "held": dict(held) if held else None,
    }


@dataclass(frozen=True, slots=True)
class LeaderRecord:
    """The value of /fedgate/leader: which replica leads and where to reach it."""

    id: str
    grpc: str = ""
    admin: str = ""
    since: float = 0.0

    def encode(self) -> bytes:
        return dumps({"id": self.id, "grpc": self.grpc, "admin": self.admin, "since": self.since})

    @classmethod
    def decode(cls, raw: bytes) -> LeaderRecord:
        o = loads(raw, "leader record")
        try:
            return cls(
                str(o["id"]), str(o.get("grpc", "")), str(o.get("admin", "")), float(o["since"])
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CodecError(f"leader record: {e}") from e


def changed_keys(
    current: Mapping[str, bytes], wanted: Mapping[str, bytes], prefix: str | None = None
) -> tuple[dict[str, bytes], list[str]]:
    """(puts, deletes) turning `current` into `wanted`; deletes only keys under `prefix`."""
    puts = {k: v for k, v in wanted.items() if current.get(k) != v}
    deletes = [k for k in current if k not in wanted and (prefix is None or k.startswith(prefix))]
    return puts, sorted(deletes)
