"""The Kubernetes MCS merge (KEP-1645), pure: every cluster's ServiceExports -> ServiceImports.

Rules:
- Namespace sameness: exports with the same (namespace, name) in any cluster are one service.
- Only exports of live clusters count: a cluster is live while its leased `info` key exists.
- Ports are the union of every export's ports. Named ports are matched by name, unnamed ones by
  (protocol, port); an unnamed port equal in (protocol, port) to a named one is the same port.
- Conflicting fields (one port name with a different port or protocol, or one (protocol, port)
  under two names) resolve to the OLDEST export (by `created`, ties by cluster name), and every
  export of the service carries a `Conflict` condition naming the clusters and ports; a service
  without conflicts carries `Valid`.
- Endpoints are the union of the live exports' endpoints; the VIP comes from `vips` and is ""
  until the controller allocated one.

The result does not depend on input order (exports are sorted first). It deliberately does no
I/O and allocates nothing: VIP allocation and status writing belong to the controller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mesh.model import (
    ClusterInfo,
    Condition,
    Endpoint,
    MergedService,
    ServiceExport,
    ServicePort,
)
from mesh.naming import ServiceKey

VALID = Condition(type="Valid", status=True, reason="Merged", message="")


@dataclass(frozen=True, slots=True)
class _Accepted:
    port: ServicePort
    cluster: str  # the oldest export that brought this port


def _describe(p: ServicePort) -> str:
    label = f"{p.name!r} " if p.name else "unnamed "
    return f"{label}{p.port}/{p.protocol}"


def _merge_ports(exports: list[ServiceExport]) -> tuple[tuple[ServicePort, ...], list[str]]:
    """Union the ports of `exports` (sorted oldest first); returns (ports, conflict messages)."""
    accepted: list[_Accepted] = []
    conflicts: list[str] = []
    for export in exports:
        for p in export.ports:
            same_name = next((a for a in accepted if p.name and a.port.name == p.name), None)
            if same_name is not None:
                if (same_name.port.port, same_name.port.protocol) != (p.port, p.protocol):
                    conflicts.append(
                        f"port {p.name!r}: cluster {export.cluster} exports {p.port}/{p.protocol}"
                        f", cluster {same_name.cluster} (oldest) exports "
                        f"{same_name.port.port}/{same_name.port.protocol}"
                    )
                continue
            same_number = next(
                (a for a in accepted if (a.port.port, a.port.protocol) == (p.port, p.protocol)),
                None,
            )
            if same_number is not None:
                if p.name and same_number.port.name and p.name != same_number.port.name:
                    conflicts.append(
                        f"port {p.port}/{p.protocol}: cluster {export.cluster} names it "
                        f"{p.name!r}, cluster {same_number.cluster} (oldest) names it "
                        f"{same_number.port.name!r}"
                    )
                continue
            accepted.append(_Accepted(p, export.cluster))
    return tuple(a.port for a in accepted), conflicts


def _export_order(
    x: ServiceExport,
) -> tuple[float, str, tuple[ServicePort, ...], tuple[Endpoint, ...]]:
    # A total order, so the merge is independent of input order even for odd inputs.
    return (x.created, x.cluster, x.ports, x.endpoints)


def merge_service(
    key: ServiceKey, exports: Iterable[ServiceExport], vip: str = ""
) -> MergedService:
    """Merge the live exports of one service (the caller filtered out dead clusters)."""
    ordered = sorted(exports, key=_export_order)
    ports, conflicts = _merge_ports(ordered)
    if conflicts:
        clusters = ", ".join(sorted({x.cluster for x in ordered}))
        condition = Condition(
            type="Conflict",
            status=True,
            reason="PortConflict",
            message=f"exports in clusters {clusters} conflict, the oldest export wins: "
            + "; ".join(conflicts),
        )
    else:
        condition = VALID
    endpoints = sorted({e for x in ordered for e in x.endpoints})
    return MergedService(
        key=key,
        vip=vip,
        ports=ports,
        clusters=tuple(sorted({x.cluster for x in ordered})),
        endpoints=tuple(endpoints),
        conditions=(condition,),
    )


def merge(
    clusters: Iterable[ClusterInfo],
    exports: Iterable[ServiceExport],
    vips: Mapping[ServiceKey, str],
) -> tuple[MergedService, ...]:
    """Every service exported by a live cluster, merged, sorted by key."""
    live = {c.name for c in clusters}
    by_key: dict[ServiceKey, list[ServiceExport]] = {}
    for x in exports:
        if x.cluster in live:
            by_key.setdefault(x.key, []).append(x)
    return tuple(merge_service(key, xs, vips.get(key, "")) for key, xs in sorted(by_key.items()))


def export_conditions(
    services: Iterable[MergedService], exports: Iterable[ServiceExport]
) -> dict[tuple[str, ServiceKey], tuple[Condition, ...]]:
    """The status each (cluster, service) export carries: its merged service's conditions.

    MCS puts a `Conflict` condition on every export of a conflicting service; the leader writes
    these as export status. Exports of dead clusters or unmerged services get nothing.
    """
    by_key = {s.key: s for s in services}
    out: dict[tuple[str, ServiceKey], tuple[Condition, ...]] = {}
    for x in exports:
        service = by_key.get(x.key)
        if service is not None and x.cluster in service.clusters:
            out[(x.cluster, x.key)] = service.conditions
    return out
