"""Cluster liveness with flap damping, pure: which clusters may be routed to.

A cluster is *present* while its agent's leased `info` key exists in etcd. A lease that goes
away means "the agent is gone", not "the cluster is gone": the gateway and pods of a cluster
whose agent crashed (or lost etcd) keep serving, as Istio and Linkerd keep serving a remote
cluster on its last config. So a Live cluster whose lease vanishes becomes *Detached*: it stays
routed, on the last catalog the controller saw (federation.catalog keeps it), for
`detach_grace` seconds, while the data plane's probes decide whether calls go there (peer
gateways probe its gateway; an unreachable one is refused at once and avoided by sidecars,
docs/traffic.md). "Cluster gone" is: lease expired AND `detach_grace` elapsed without it
returning. Only then is it Down. A return within the grace is no loss at all: nothing was
removed, so nothing is damped. `detach_grace=0` removes a cluster the moment its lease goes.

What is damped is the way back after a removal: a cluster that keeps being removed is not
re-added on every blip. The rule is route-flap damping as in BGP (RFC 2439, figure of merit
with exponential decay):

- every loss adds `penalty` to the cluster's figure of merit, which halves every `half_life`;
- a cluster that returns while its merit is at or above `suppress` is held out (Suppressed)
  until the merit decays below `reuse`;
- the merit is capped so that no cluster is held out longer than `max_hold` after it returned;
- a Down cluster whose merit decayed below `forget` is forgotten.

With the defaults one loss never delays a return; two losses within ~10 s hold the cluster out
for ~10-15 s; a cluster flapping for ever is held out at most 60 s at a time.

| state      | event (at `observe`)            | condition               | next       | routed |
|------------|---------------------------------|-------------------------|------------|--------|
| (unknown)  | present                         |                         | Live       | yes    |
| Live       | absent                          | detach_grace > 0        | Detached   | yes    |
| Live       | absent                          | detach_grace = 0        | Down, +P   | no     |
| Detached   | present                         |                         | Live       | yes    |
| Detached   | absent                          | since + grace <= now    | Down, +P   | no     |
| Down       | present                         | merit < suppress        | Live       | yes    |
| Down       | present                         | merit >= suppress       | Suppressed | no     |
| Down       | absent                          | merit < forget          | (unknown)  | no     |
| Suppressed | present                         | merit < reuse           | Live       | yes    |
| Suppressed | absent                          |                         | Down, +P   | no     |

Time comes in as `now` (seconds since the epoch, so a record written by one replica means the
same thing to another); `next_deadline()` says when a Suppressed cluster may be reused, so the
driver knows when to call `observe` again without a catalog change. The state is a set of
immutable `ClusterLiveness` records: the leader persists them (federation.status), replicas and
a newly elected leader `restore()` them, so every replica damps the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

LIVE = "Live"
DETACHED = "Detached"  # lease gone, still routed on its last catalog (module docstring)
DOWN = "Down"
SUPPRESSED = "Suppressed"
STATES = (LIVE, DETACHED, DOWN, SUPPRESSED)
ROUTED = (LIVE, DETACHED)


@dataclass(frozen=True, slots=True)
class DampingSettings:
    """Flap damping parameters (see the module docstring); `penalty=0` disables damping."""

    penalty: float = 1000.0
    suppress: float = 1500.0
    reuse: float = 750.0
    half_life: float = 10.0  # seconds
    max_hold: float = 60.0  # seconds a returned cluster may be held out at most
    forget: float = 100.0
    # Seconds a cluster whose lease went away stays routed on its last catalog (Detached).
    detach_grace: float = 300.0

    def __post_init__(self) -> None:
        if self.half_life <= 0 or self.max_hold < 0 or self.detach_grace < 0:
            raise ValueError("half_life must be > 0, max_hold and detach_grace >= 0")
        if not 0 < self.reuse <= self.suppress:
            raise ValueError("need 0 < reuse <= suppress")

    @property
    def ceiling(self) -> float:
        """The highest merit: it decays to `reuse` in exactly `max_hold` seconds."""
        return self.reuse * 2 ** (self.max_hold / self.half_life)


@dataclass(frozen=True, slots=True)
class ClusterLiveness:
    """One cluster's damping record; `merit` was computed at `updated`."""

    cluster: str
    state: str
    merit: float
    updated: float  # when `merit` was last computed (epoch seconds)
    since: float  # when the cluster entered `state`
    losses: int = 0  # lease losses seen (a counter for operators)

    def merit_at(self, now: float, settings: DampingSettings) -> float:
        elapsed = max(0.0, now - self.updated)
        return float(self.merit * 0.5 ** (elapsed / settings.half_life))

    def reusable_at(self, settings: DampingSettings) -> float:
        """When the merit decays below `reuse` (the end of a Suppressed hold)."""
        if self.merit <= settings.reuse:
            return self.updated
        return self.updated + settings.half_life * math.log2(self.merit / settings.reuse)


class Liveness:
    """The damping state of every cluster seen; `observe` is the only transition function."""

    def __init__(self, settings: DampingSettings | None = None) -> None:
        self.settings = settings or DampingSettings()
        self._records: dict[str, ClusterLiveness] = {}

    def restore(self, records: Iterable[ClusterLiveness]) -> None:
        """Adopt persisted records (a new leader, or a replica following the leader)."""
        self._records = {r.cluster: r for r in records if r.state in STATES}

    def records(self) -> Mapping[str, ClusterLiveness]:
        return dict(self._records)

    def record(self, cluster: str) -> ClusterLiveness | None:
        return self._records.get(cluster)

    def observe(self, present: Iterable[str], now: float) -> frozenset[str]:
        """Apply the table to every cluster; return the clusters to route to."""
        s = self.settings
        present_set = set(present)
        for name in present_set - self._records.keys():
            self._records[name] = ClusterLiveness(name, LIVE, 0.0, now, now)
        for name, r in list(self._records.items()):
            here = name in present_set
            merit = r.merit_at(now, s)
            if r.state == LIVE and not here and s.detach_grace > 0:
                self._records[name] = ClusterLiveness(name, DETACHED, merit, now, now, r.losses)
            elif r.state == DETACHED and here:
                self._records[name] = ClusterLiveness(name, LIVE, merit, now, now, r.losses)
            elif (r.state == LIVE and not here) or (
                r.state == DETACHED and now >= r.since + s.detach_grace
            ):
                merit = min(merit + s.penalty, s.ceiling)
                self._records[name] = ClusterLiveness(name, DOWN, merit, now, now, r.losses + 1)
            elif r.state == DOWN and here:
                state = SUPPRESSED if s.penalty and merit >= s.suppress else LIVE
                self._records[name] = ClusterLiveness(name, state, merit, now, now, r.losses)
            elif r.state == DOWN and merit < s.forget:
                del self._records[name]
            elif r.state == SUPPRESSED and here and merit < s.reuse:
                self._records[name] = ClusterLiveness(name, LIVE, merit, now, now, r.losses)
            elif r.state == SUPPRESSED and not here:
                merit = min(merit + s.penalty, s.ceiling)
                self._records[name] = ClusterLiveness(name, DOWN, merit, now, now, r.losses + 1)
        return self.routed()

    def routed(self) -> frozenset[str]:
        """The clusters to route to: Live, and Detached within their grace."""
        return frozenset(n for n, r in self._records.items() if r.state in ROUTED)

    def detached(self) -> frozenset[str]:
        return frozenset(n for n, r in self._records.items() if r.state == DETACHED)

    def next_deadline(self) -> float | None:
        """The earliest time `observe` may change something without any cluster changing."""
        s = self.settings
        times = [r.reusable_at(s) for r in self._records.values() if r.state == SUPPRESSED]
        times += [r.since + s.detach_grace for r in self._records.values() if r.state == DETACHED]
        for r in self._records.values():
            if r.state == DOWN and r.merit > 0:
                times.append(r.updated + s.half_life * math.log2(r.merit / s.forget))
        return min(times) if times else None

    def persistable(self) -> dict[str, ClusterLiveness]:
        """Records worth writing: merit is rounded so a pure decay is not a change."""
        return {n: replace(r, merit=round(r.merit, 3)) for n, r in self._records.items()}
