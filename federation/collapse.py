"""The collapse guard, pure: may the controller publish a config that removes this much?

A config that suddenly lacks most clusters or endpoints is far more often a control-plane
fault (etcd restarted, leases lapsed together, an agent's source listed nothing) than a real
change, and pushing it turns a control-plane blip into an outage of the data plane. So, as
Envoy keeps its last config when a management server answers with an empty one, the
controller holds its last good config instead of publishing such a step ("stale is better
than empty"), and says so (`fedgate status`, the `held` field of the config status).

Rules, comparing the candidate with the last config published:

| candidate drops                                          | session age  | verdict          |
|----------------------------------------------------------|--------------|------------------|
| nothing (or only additions and changes)                  | any          | publish          |
| some clusters                                            | < min_session| hold             |
| more than `max_cluster_share` of the clusters (and > 1)  | any          | hold             |
| more than `max_endpoint_share` of the endpoints (and     | any          | hold             |
|   more than `min_endpoints`)                             |              |                  |
| otherwise                                                | any          | publish          |

*Session age* is how long the replica's view of etcd has been continuous (since its last
load, or since its watch resumed after a failure); while it is younger than the agents'
lease TTL, a missing lease may only mean the agent has not renewed it yet. That rule is for
clusters (a lease holds a whole cluster); endpoints removed while their cluster stays were
removed by its agent on purpose (a rollout), so a young session holds them only by share.

A hold ends when a candidate no longer drops too much (the agents came back), or when the
same drop has been wanted for `confirm_after` seconds with a session at least `min_session`
old: then the drop is real (an operator removed most of the federation) and is published.
Dropping one cluster of two is always allowed (a cluster really does die), and endpoint
shares only count above `min_endpoints`, so small federations are not frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.model import Snapshot


@dataclass(frozen=True, slots=True)
class CollapseSettings:
    max_cluster_share: float = 0.5  # share of the published clusters one step may drop
    max_endpoint_share: float = 0.5  # share of the published endpoints one step may drop
    min_endpoints: int = 10  # drops of at most this many endpoints are never held for share
    min_session: float = 10.0  # seconds; the agents' lease TTL (fedgate/ passes it)
    confirm_after: float = 30.0  # seconds a held drop must persist before it is published

    def __post_init__(self) -> None:
        for name in ("max_cluster_share", "max_endpoint_share"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")
        if self.min_session < 0 or self.confirm_after < 0 or self.min_endpoints < 0:
            raise ValueError("min_session, confirm_after and min_endpoints must be >= 0")


@dataclass(frozen=True, slots=True)
class Drop:
    """What a candidate config removes relative to the published one."""

    clusters: frozenset[str]
    endpoints: int  # (service, endpoint) pairs no longer in the config
    published_clusters: int
    published_endpoints: int

    def __bool__(self) -> bool:
        return bool(self.clusters or self.endpoints)

    def describe(self) -> str:
        parts = []
        if self.clusters:
            parts.append(
                f"{len(self.clusters)} of {self.published_clusters} clusters "
                f"({', '.join(sorted(self.clusters))})"
            )
        if self.endpoints:
            parts.append(f"{self.endpoints} of {self.published_endpoints} endpoints")
        return " and ".join(parts) or "nothing"


@dataclass(frozen=True, slots=True)
class Verdict:
    publish: bool
    reason: str = ""  # why it is held ("" when published)
    drop: Drop | None = None


def _endpoints(snapshot: Snapshot) -> set[tuple[str, str, str]]:
    return {(str(s.key), e.cluster, e.address) for s in snapshot.services for e in s.endpoints}


def drop_of(published: Snapshot, candidate: Snapshot) -> Drop:
    old_clusters = {c.name for c in published.clusters}
    old_endpoints = _endpoints(published)
    return Drop(
        clusters=frozenset(old_clusters - {c.name for c in candidate.clusters}),
        endpoints=len(old_endpoints - _endpoints(candidate)),
        published_clusters=len(old_clusters),
        published_endpoints=len(old_endpoints),
    )


class CollapseGuard:
    """Decides each candidate (module docstring); remembers since when a drop is held."""

    def __init__(self, settings: CollapseSettings | None = None) -> None:
        self.settings = settings or CollapseSettings()
        self.held_since: float | None = None  # when the current hold began
        self.held: Verdict | None = None  # the current hold, for status
        self.holds = 0  # metric: holds begun

    def check(
        self, published: Snapshot | None, candidate: Snapshot, session_age: float, now: float
    ) -> Verdict:
        verdict = self._decide(published, candidate, session_age, now)
        if verdict.publish:
            self.held_since, self.held = None, None
        else:
            if self.held_since is None:
                self.held_since = now
                self.holds += 1
            self.held = verdict
        return verdict

    def _decide(
        self, published: Snapshot | None, candidate: Snapshot, session_age: float, now: float
    ) -> Verdict:
        s = self.settings
        if published is None:
            return Verdict(True)
        drop = drop_of(published, candidate)
        if not drop:
            return Verdict(True)
        young = session_age < s.min_session
        if young and drop.clusters:
            reason = (
                f"would drop {drop.describe()} while the etcd session is {session_age:.1f} s "
                f"old (< {s.min_session:g} s, the lease TTL)"
            )
        elif len(drop.clusters) > max(1, int(s.max_cluster_share * drop.published_clusters)):
            reason = (
                f"would drop {drop.describe()}: more than {s.max_cluster_share:.0%} of the "
                "clusters in one step"
            )
        elif drop.endpoints > max(s.min_endpoints, s.max_endpoint_share * drop.published_endpoints):
            reason = (
                f"would drop {drop.describe()}: more than {s.max_endpoint_share:.0%} of the "
                "endpoints in one step"
            )
        else:
            return Verdict(True, drop=drop)
        if (
            session_age >= s.min_session
            and self.held_since is not None
            and now - self.held_since >= s.confirm_after
        ):
            return Verdict(
                True, reason=f"confirmed after {s.confirm_after:g} s: {reason}", drop=drop
            )
        return Verdict(False, reason, drop)
