"""Config generation, pure: (live clusters, merged services, policies) -> a versioned Snapshot.

The snapshot is the whole config every sidecar and gateway runs on. Its version is a content
hash of everything else in it, so the same input always yields the same version and replicas
of the controller agree on versions without talking to each other.

The federated trust bundle maps each live cluster's trust domain to the roots that cluster
published; a root vouches only for its own domain (SPIFFE federation, enforced by ca/'s
verifier). If two clusters claim one trust domain their roots are unioned: this module cannot
tell which is right, so validating trust domains against cluster names belongs upstream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import replace
from types import MappingProxyType

from mesh.codec import dumps, snapshot_to_json
from mesh.model import ClusterInfo, MergedService, Snapshot, TrafficPolicy

VERSION_BYTES = 8  # 16 hex digits: plenty to tell configs apart, short enough to log


def trust_bundle(clusters: Iterable[ClusterInfo]) -> dict[str, tuple[str, ...]]:
    bundle: dict[str, list[str]] = {}
    for c in sorted(clusters, key=lambda c: c.name):
        roots = bundle.setdefault(c.trust_domain, [])
        roots.extend(r for r in c.roots if r not in roots)
    return {td: tuple(roots) for td, roots in sorted(bundle.items())}


def _policy_order(p: TrafficPolicy) -> tuple[object, ...]:
    return (p.key, tuple((w.cluster, w.weight) for w in p.cluster_weights))


def content_version(snapshot: Snapshot) -> str:
    """A stable hash of everything in `snapshot` except its version."""
    body = dumps(snapshot_to_json(replace(snapshot, version="")))
    return hashlib.sha256(body).hexdigest()[: VERSION_BYTES * 2]


def generate(
    clusters: Iterable[ClusterInfo],
    services: Iterable[MergedService],
    policies: Iterable[TrafficPolicy],
) -> Snapshot:
    live = tuple(sorted(clusters, key=lambda c: c.name))
    unversioned = Snapshot(
        version="",
        clusters=live,
        services=tuple(sorted(services, key=lambda s: s.key)),
        policies=tuple(sorted(policies, key=_policy_order)),
        trust_bundle=MappingProxyType(trust_bundle(live)),
    )
    return replace(unversioned, version=content_version(unversioned))
