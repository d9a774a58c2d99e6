"""Choosing where one call (or one try of a request) goes: subset, cluster, endpoint. Pure.

Order of decisions, each over what the previous left:

1. **Subset**: by the effective `subsetWeights` among subsets that have endpoints (a mirror
   names its subset instead). A subset holds the endpoints carrying all its labels, local or
   remote; a remote cluster is one host behind its gateway, so a call for a subset carries the
   subset's labels (`Target.labels`) and the remote ingress picks among the endpoints that
   carry them (a cluster running mixed versions serves each subset with the right ones).
2. **Health**: a host (a local endpoint, or a whole remote cluster) is healthy unless outlier
   detection ejected it. If no host of the candidates is healthy, all are used (Envoy's panic
   mode: better an ejected host that may have recovered than certain failure). Hosts already
   tried by this request are avoided when another healthy one exists, and so are the clusters
   they belong to when a healthy host remains in a cluster the policy's weights give a share
   (Envoy's previous-hosts predicate, extended to clusters: a retry after a dead gateway or a
   failing cluster goes elsewhere, never to a cluster the policy keeps at weight 0).
3. **Cluster**: with `localityFailover`, priority tiers (own cluster, own region, any) get the
   shares `mesh.routing.priority_loads` computes from their healthy fractions, then clusters in
   the tier are weighed by `clusterWeights`; without it, `clusterWeights` over all clusters
   (`mesh.routing.weigh_clusters`; a cluster with no usable host gets nothing).
4. **Endpoint**: uniformly among the usable endpoints of the local cluster; a remote cluster
   is reached through the local gateway and any of its endpoints' identities is accepted.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mesh.errors import NoRouteError
from mesh.model import Endpoint, TrafficPolicy
from mesh.naming import SpiffeId
from mesh.routing import (
    locality_tiers,
    pick_endpoint,
    pick_weighted,
    priority_loads,
    weigh_clusters,
)
from sidecar.traffic.match import Effective

Healthy = Callable[[str], bool]


def _all_healthy(host: str) -> bool:
    return True


def remote_host(cluster: str) -> str:
    """The host key of a remote cluster (one host: its gateway hides the endpoints)."""
    return f"cluster:{cluster}"


@dataclass(frozen=True, slots=True)
class Target:
    """Where one try goes. `endpoint` is None for a remote cluster (via the local gateway)."""

    cluster: str
    endpoint: Endpoint | None
    identities: frozenset[SpiffeId]
    subset: str = ""
    panic: bool = False  # every candidate host was ejected; picked among them anyway
    labels: tuple[tuple[str, str], ...] = ()  # the subset's, for a remote cluster's ingress

    @property
    def host(self) -> str:
        return self.endpoint.address if self.endpoint is not None else remote_host(self.cluster)


@dataclass(frozen=True, slots=True)
class Balancer:
    """The endpoints of one service as this cluster's sidecars may reach them."""

    local_cluster: str
    by_cluster: Mapping[str, tuple[Endpoint, ...]]  # reachable endpoints only, sorted
    regions: Mapping[str, str]  # cluster -> region ("" unknown)
    policy: TrafficPolicy | None = None

    def hosts(self) -> tuple[str, ...]:
        """Every host outlier detection may eject (local endpoints, remote clusters)."""
        out: list[str] = []
        for c, eps in sorted(self.by_cluster.items()):
            if c == self.local_cluster:
                out.extend(e.address for e in eps)
            elif eps:
                out.append(remote_host(c))
        return tuple(out)

    def pick(
        self,
        eff: Effective,
        rng: random.Random,
        healthy: Healthy = _all_healthy,
        exclude: frozenset[str] = frozenset(),
        *,
        subset: str | None = None,
        cluster_ref: str = "",
    ) -> Target:
        """Choose a target (see the module docstring); NoRouteError says why none exists."""
        groups, subset_name = self._groups(eff, rng, subset)
        if cluster_ref:
            groups = {c: eps for c, eps in groups.items() if self._refers(cluster_ref, c)}
        groups = {c: eps for c, eps in groups.items() if eps}
        if not groups:
            what = f" in subset {subset_name}" if subset_name else ""
            where = f" in cluster {cluster_ref}" if cluster_ref else ""
            raise NoRouteError(f"no reachable endpoint{what}{where}")
        usable, panic = self._usable(eff, groups, healthy, exclude)
        if exclude:
            usable = self._elsewhere(eff, usable, exclude)
        counts = {c: float(len(u)) for c, u in usable.items()}
        cluster = self._cluster(eff, groups, counts, rng)
        eps = groups[cluster]
        if cluster == self.local_cluster:
            endpoint = pick_endpoint(usable[cluster], rng)
            return Target(cluster, endpoint, frozenset((endpoint.identity,)), subset_name, panic)
        labels = self._labels(subset_name)
        identities = frozenset(e.identity for e in eps)
        return Target(cluster, None, identities, subset_name, panic, labels)

    # -- steps ------------------------------------------------------------------------------

    def _refers(self, ref: str, cluster: str) -> bool:
        if ref == "local":
            return cluster == self.local_cluster
        if ref == "remote":
            return cluster != self.local_cluster
        return cluster == ref

    def _groups(
        self, eff: Effective, rng: random.Random, subset: str | None
    ) -> tuple[dict[str, tuple[Endpoint, ...]], str]:
        policy = self.policy
        if subset is None and eff.subset_weights:
            options = [
                (w.subset, float(w.weight))
                for w in eff.subset_weights
                if any(self._in_subset(w.subset).values())
            ]
            if not options:
                names = ", ".join(w.subset for w in eff.subset_weights)
                raise NoRouteError(f"no reachable endpoint in subsets {names}")
            subset = pick_weighted(options, rng)
        if not subset:
            return dict(self.by_cluster), ""
        if policy is None or policy.subset(subset) is None:
            raise NoRouteError(f"subset {subset} is not defined")
        return self._in_subset(subset), subset

    def _labels(self, subset: str) -> tuple[tuple[str, str], ...]:
        s = self.policy.subset(subset) if self.policy is not None and subset else None
        return s.labels if s is not None else ()

    def _in_subset(self, name: str) -> dict[str, tuple[Endpoint, ...]]:
        s = self.policy.subset(name) if self.policy is not None else None
        if s is None:
            return {}
        return {
            c: tuple(e for e in eps if e.has_labels(s.labels)) for c, eps in self.by_cluster.items()
        }

    def _usable(
        self,
        eff: Effective,
        groups: Mapping[str, tuple[Endpoint, ...]],
        healthy: Healthy,
        exclude: frozenset[str],
    ) -> tuple[dict[str, tuple[Endpoint, ...]], bool]:
        """Per cluster, the endpoints a try may use (remote: all or none, as one host)."""

        def hosts_ok(ok: Callable[[str], bool]) -> dict[str, tuple[Endpoint, ...]]:
            out: dict[str, tuple[Endpoint, ...]] = {}
            for c, eps in groups.items():
                if c == self.local_cluster:
                    out[c] = tuple(e for e in eps if ok(e.address))
                else:
                    out[c] = eps if ok(remote_host(c)) else ()
            return out

        usable = hosts_ok(healthy)
        panic = not any(usable.values())
        if panic:
            usable = {c: tuple(eps) for c, eps in groups.items()}
        fresh = hosts_ok(lambda h: h not in exclude)
        preferred = {c: tuple(e for e in u if e in fresh[c]) for c, u in usable.items()}
        if self._weighted(eff, preferred) or (
            any(preferred.values()) and not self._weighted(eff, usable)
        ):
            usable = preferred
        return usable, panic

    def _weighted(self, eff: Effective, usable: Mapping[str, tuple[Endpoint, ...]]) -> bool:
        """Whether a cluster that the policy's weights give a share has a usable host."""
        return any(u and self._eligible(eff, c) for c, u in usable.items())

    def _eligible(self, eff: Effective, cluster: str) -> bool:
        """Whether the policy's weights give `cluster` a share (no weights: every cluster)."""
        weights = eff.cluster_weights
        return not weights or any(
            w.weight > 0 and self._refers(w.cluster, cluster) for w in weights
        )

    def _elsewhere(
        self,
        eff: Effective,
        usable: dict[str, tuple[Endpoint, ...]],
        exclude: frozenset[str],
    ) -> dict[str, tuple[Endpoint, ...]]:
        """`usable` without the clusters of hosts in `exclude`, if a cluster that the policy's
        weights give a share still has usable hosts; else `usable`."""
        tried = {
            c
            for c, eps in self.by_cluster.items()
            if remote_host(c) in exclude
            or (c == self.local_cluster and any(e.address in exclude for e in eps))
        }
        if not tried:
            return usable
        others = {c for c, u in usable.items() if u and c not in tried and self._eligible(eff, c)}
        if not others:
            return usable
        return {c: u if c in others else () for c, u in usable.items()}

    def _cluster(
        self,
        eff: Effective,
        groups: Mapping[str, tuple[Endpoint, ...]],
        counts: Mapping[str, float],
        rng: random.Random,
    ) -> str:
        policy = self.policy
        failover = policy.locality_failover if policy is not None else None
        candidates: Mapping[str, float] = counts
        if failover is not None:
            tiers = locality_tiers(self.local_cluster, self.regions, groups)
            health = [
                sum(counts[c] for c in tier) / sum(len(groups[c]) for c in tier) for tier in tiers
            ]
            loads = priority_loads(health, failover.spill_over_threshold)
            tier = pick_weighted(list(zip(tiers, loads, strict=True)), rng)
            candidates = {c: counts[c] for c in tier}
        weights = weigh_clusters(candidates, eff.cluster_weights, self.local_cluster)
        return pick_weighted(sorted(weights.items()), rng)
