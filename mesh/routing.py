"""Routing maths: which cluster, then which endpoint, serves a call.

Weights come from the service's `TrafficPolicy` (`local`, `remote` or named clusters). Without a
policy every healthy endpoint in the clusterset is equally likely, as Kubernetes MCS does. A
weight for a cluster with no endpoints is dropped and the rest renormalised, so a weighted
service never routes into a void. Randomness is injected (`random.Random`) so tests are exact.

Locality failover (`locality_tiers`, `priority_loads`) follows Envoy's priority levels: tier 0 is
the caller's own cluster, tier 1 the other clusters of its region, tier 2 every other cluster.
A tier whose healthy share `h` is below the spill-over threshold `T` keeps only `h / T` of the
traffic and the rest spills to the next tier (T = 70 % is Envoy's overprovisioning factor 1.4);
when all tiers together are below 100 % the loads are normalised. Subset weights
(`pick_weighted`) choose a subset before any of this.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from mesh.errors import NoRouteError
from mesh.model import ClusterWeight, Endpoint, MergedService, TrafficPolicy

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ClusterChoice:
    cluster: str
    weight: float


def cluster_weights(
    service: MergedService, policy: TrafficPolicy | None, local_cluster: str
) -> tuple[ClusterChoice, ...]:
    """Effective weight of each cluster that has endpoints, as fractions summing to 1."""
    counts: dict[str, int] = {}
    for ep in service.endpoints:
        counts[ep.cluster] = counts.get(ep.cluster, 0) + 1
    raw = weigh_clusters(counts, policy.cluster_weights if policy else (), local_cluster)
    weight_sum = sum(raw.values(), 0.0)
    return tuple(ClusterChoice(c, w / weight_sum) for c, w in sorted(raw.items()) if w > 0)


def weigh_clusters(
    counts: Mapping[str, float], weights: Sequence[ClusterWeight], local_cluster: str
) -> dict[str, float]:
    """Relative weight of each cluster in `counts` (cluster -> endpoints, or healthy endpoints)
    under `weights`; without weights, or when every weighted cluster is empty, in proportion to
    the counts. Clusters with a zero count get nothing."""
    counts = {c: n for c, n in counts.items() if n > 0}
    if not counts:
        return {}
    raw: dict[str, float] = {}
    if not weights:
        raw = {c: float(n) for c, n in counts.items()}
    else:
        remote = [c for c in counts if c != local_cluster]
        for w in weights:
            if w.cluster == "local":
                if local_cluster in counts:
                    raw[local_cluster] = raw.get(local_cluster, 0.0) + w.weight
            elif w.cluster == "remote":
                # Split the remote share between remote clusters by endpoint count.
                total = sum(counts[c] for c in remote)
                for c in remote:
                    raw[c] = raw.get(c, 0.0) + w.weight * counts[c] / total
            elif w.cluster in counts:
                raw[w.cluster] = raw.get(w.cluster, 0.0) + w.weight
        if sum(raw.values(), 0.0) <= 0:
            # Every weighted cluster is empty: fall back to what exists rather than fail.
            raw = {c: float(n) for c, n in counts.items()}
    return {c: w for c, w in raw.items() if w > 0}


def pick_cluster(choices: tuple[ClusterChoice, ...], rng: random.Random) -> str:
    if not choices:
        raise NoRouteError("no cluster has a healthy endpoint")
    x = rng.random()
    acc = 0.0
    for c in choices:
        acc += c.weight
        if x < acc:
            return c.cluster
    return choices[-1].cluster


def pick_endpoint(endpoints: tuple[Endpoint, ...], rng: random.Random) -> Endpoint:
    if not endpoints:
        raise NoRouteError("no healthy endpoint")
    return endpoints[rng.randrange(len(endpoints))]


def pick_weighted(choices: Sequence[tuple[T, float]], rng: random.Random) -> T:
    """One item, with probability proportional to its (non-negative) weight."""
    total = sum(w for _, w in choices if w > 0)
    if total <= 0:
        raise NoRouteError("nothing to choose from")
    x = rng.random() * total
    acc = 0.0
    last: T | None = None
    for item, w in choices:
        if w <= 0:
            continue
        acc += w
        last = item
        if x < acc:
            return item
    assert last is not None
    return last  # rounding: x landed on the very end


def locality_tiers(
    local_cluster: str, regions: Mapping[str, str], clusters: Iterable[str]
) -> tuple[tuple[str, ...], ...]:
    """`clusters` in priority tiers: the caller's own cluster, then the other clusters of its
    region, then the rest; empty tiers are left out. A cluster without a known region (or a
    caller without one) is never "same region"."""
    own_region = regions.get(local_cluster, "")
    tiers: list[list[str]] = [[], [], []]
    for c in sorted(set(clusters)):
        if c == local_cluster:
            tiers[0].append(c)
        elif own_region and regions.get(c, "") == own_region:
            tiers[1].append(c)
        else:
            tiers[2].append(c)
    return tuple(tuple(t) for t in tiers if t)


def priority_loads(health: Sequence[float], spill_over_threshold: float) -> tuple[float, ...]:
    """The share of traffic each priority tier gets, from each tier's healthy share (0..1).

    A tier at or above `spill_over_threshold` percent healthy keeps everything that reaches it;
    below, it keeps `health * 100 / threshold` and the rest spills to the next tier. If the
    tiers together cannot take 100 %, the loads are scaled up to sum to 1 (Envoy's
    normalisation). All tiers without any healthy endpoint: all zero (the caller decides).
    A threshold of 0 never spills while any endpoint of a tier is healthy.
    """
    if spill_over_threshold <= 0:
        effective = [1.0 if h > 0 else 0.0 for h in health]
    else:
        factor = 100.0 / spill_over_threshold
        effective = [min(1.0, max(0.0, h) * factor) for h in health]
    total = sum(effective)
    if total <= 0:
        return tuple(0.0 for _ in health)
    if total < 1.0:
        return tuple(e / total for e in effective)
    loads = []
    remaining = 1.0
    for e in effective:
        share = min(remaining, e)
        loads.append(share)
        remaining -= share
    return tuple(loads)
