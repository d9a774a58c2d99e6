"""Config generation, pure: (live clusters, merged services, config) -> a versioned Snapshot.

The snapshot is the whole config every sidecar and gateway runs on. Its version is a content
hash (SHA-256 over the snapshot's JSON without services, then each service's JSON digest in
order), so the same input always yields the same version and replicas of the controller agree
on versions without talking to each other: a proxy that fails over to another replica
announces its version and gets nothing resent. With a `FragmentCache` (federation.api.delta)
an unchanged service costs no encoding, so a version after an endpoint change costs one
service's JSON, not the federation's.

`config` is a `FederationConfig` (federation.fedconfig): everything the controller read under
/fedgate/config/. New config kinds extend that object, not this signature. (A plain iterable of
`TrafficPolicy` is still accepted.) Where the Federation document declares a cluster's network,
region or zone, that declaration wins over what the cluster's agent published: it is the
operator's reviewed config, and locality failover's "same region" tier depends on it.

The federated trust bundle maps each live cluster's trust domain to the roots that cluster
published; a root vouches only for its own domain (SPIFFE federation, enforced by ca/'s
verifier). `trusted` adds the roots of clusters out of routing but still in their trust grace
(federation.controller): a cluster's identity stays verifiable through a brief loss, so a
blip does not cut the connections it has open. If two clusters claim one trust domain their
roots are unioned: this module cannot tell which is right, so validating trust domains against
cluster names belongs upstream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import replace
from types import MappingProxyType

from ca.denylist import entries_from_config
from federation.api.delta import FragmentCache, skeleton_json, sort_services
from federation.fedconfig import EMPTY_CONFIG, FederationConfig, Locality
from mesh.model import ClusterInfo, MergedService, Snapshot, TrafficPolicy

VERSION_BYTES = 8  # 16 hex digits: plenty to tell configs apart, short enough to log


def trust_bundle(clusters: Iterable[ClusterInfo]) -> dict[str, tuple[str, ...]]:
    bundle: dict[str, list[str]] = {}
    for c in sorted(clusters, key=lambda c: c.name):
        roots = bundle.setdefault(c.trust_domain, [])
        roots.extend(r for r in c.roots if r not in roots)
    return {td: tuple(roots) for td, roots in sorted(bundle.items())}


def content_version(snapshot: Snapshot, cache: FragmentCache | None = None) -> str:
    """A stable hash of everything in `snapshot` except its version."""
    cache = FragmentCache() if cache is None else cache
    h = hashlib.sha256(skeleton_json(replace(snapshot, version="")))
    for s in snapshot.services:
        h.update(cache.digest(s))
    return h.hexdigest()[: VERSION_BYTES * 2]


def with_locality(cluster: ClusterInfo, declared: Locality | None) -> ClusterInfo:
    """`cluster` with the Federation's declared locality fields laid over what it published."""
    if declared is None:
        return cluster
    return replace(
        cluster,
        network=declared.network or cluster.network,
        region=declared.region or cluster.region,
        zone=declared.zone or cluster.zone,
    )


def _as_config(config: FederationConfig | Iterable[TrafficPolicy]) -> FederationConfig:
    if isinstance(config, FederationConfig):
        return config
    return replace(EMPTY_CONFIG, policies=tuple(config))


def generate(
    clusters: Iterable[ClusterInfo],
    services: Iterable[MergedService],
    config: FederationConfig | Iterable[TrafficPolicy] = EMPTY_CONFIG,
    *,
    cache: FragmentCache | None = None,
    trusted: Iterable[ClusterInfo] = (),
) -> Snapshot:
    cfg = _as_config(config)
    live = tuple(
        with_locality(c, cfg.localities.get(c.name)) for c in sorted(clusters, key=lambda c: c.name)
    )
    unversioned = Snapshot(
        version="",
        clusters=live,
        services=sort_services(services),
        policies=tuple(sorted(cfg.policies, key=lambda p: (p.key.namespace, p.key.name))),
        trust_bundle=MappingProxyType(trust_bundle((*live, *trusted))),
        # Every AuthorizationPolicy: destination sidecars enforce those of their services.
        authorization=cfg.authorization,
        # Identity issue: the deny list (/fedgate/config/denied/, format in ca.denylist);
        # malformed entries are skipped (the CLI validates what it writes).
        denied=entries_from_config(cfg.denied)[0],
    )
    return replace(unversioned, version=content_version(unversioned, cache))
