"""Routing maths: which cluster, then which endpoint, serves a call.

Weights come from the service's `TrafficPolicy` (`local`, `remote` or named clusters). Without a
policy every healthy endpoint in the clusterset is equally likely, as Kubernetes MCS does. A
weight for a cluster with no endpoints is dropped and the rest renormalised, so a weighted
service never routes into a void. Randomness is injected (`random.Random`) so tests are exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mesh.errors import NoRouteError
from mesh.model import Endpoint, MergedService, TrafficPolicy


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
    if not counts:
        return ()
    raw: dict[str, float] = {}
    if policy is None or not policy.cluster_weights:
        raw = {c: float(n) for c, n in counts.items()}
    else:
        remote = [c for c in counts if c != local_cluster]
        for w in policy.cluster_weights:
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
    weight_sum = sum(raw.values(), 0.0)
    return tuple(ClusterChoice(c, w / weight_sum) for c, w in sorted(raw.items()) if w > 0)


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
