"""Config push telemetry, pure: how long each version took to reach each subscriber.

Push latency is the time from a version being published (`SnapshotPublisher.update`) to the
subscriber's ACK of it, or, for a stream opened after the version was published, from the
stream's hello (a proxy that connects late did not wait for the controller). Latencies go
into one histogram per (node kind, cluster), like Istio's `pilot_proxy_convergence_time`;
the last value and version per subscriber are kept while its stream is open. ACKs and NACKs
are counted per (kind, cluster). Times come in as arguments: this module reads no clock.

Lag: each open stream's subscriber records since when the replica has published a version the
proxy does not run (`behind_since`: the publication time of the first such version; moved
on to the publication of the version after the one it ACKs when that is still known, so a
proxy that keeps up with sustained churn is only as late as it is; cleared when it ACKs the
current version, or when the current version is one it already runs). It is
set when a version is *offered* to the stream, not when the stream sends it, so a stream that
never sends (a stalled take/offer loop, a write that never completes) still shows its lag
growing. A proxy that NACKed the current version lags too: it runs stale config either way.

`fedgate.metrics` turns it into Prometheus families; nothing here knows Prometheus.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Seconds: one debounced sync is ~0.1 s, a push to 1,000 streams ~0.5 s (docs/controller.md).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Group = tuple[str, str]  # (node kind, cluster)


@dataclass(slots=True)
class Histogram:
    """Cumulative-on-export histogram: `counts[i]` observations <= BUCKETS[i]; the last slot
    counts those above every bound (+Inf)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, cumulative count) pairs, "+Inf" last, as Prometheus exposes them."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass(slots=True)
class Subscriber:
    node: str
    kind: str
    cluster: str
    version: str = ""  # the last version it ACKed on this stream (or announced in its hello)
    latency: float | None = None  # seconds, for that version
    behind_since: float | None = None  # see the module docstring
    sent: str = ""  # the last version sent on this stream
    nacked: str = ""  # the last version it refused, if it refused the last one sent

    def offered(self, version: str, published_at: float) -> None:
        """The replica offers `version` (now current) to this stream."""
        if version == self.version:
            self.behind_since = None
        elif self.behind_since is None:
            self.behind_since = published_at

    def running(
        self, version: str, current: str | None, now: float, since: float | None = None
    ) -> None:
        """The proxy runs `version` (an ACK, or what its hello announced); `since`: when the
        version after it was published, if known (a proxy that moves is only that late)."""
        self.version = version
        if current is None or version == current:
            self.behind_since = None
        elif since is not None:
            self.behind_since = since
        elif self.behind_since is None:
            self.behind_since = now

    def lag(self, now: float) -> float:
        """Seconds this proxy has been behind the replica's current version (0: up to date)."""
        return 0.0 if self.behind_since is None else max(0.0, now - self.behind_since)


@dataclass(slots=True)
class PushStats:
    latency: dict[Group, Histogram] = field(default_factory=dict)
    acks: dict[Group, int] = field(default_factory=dict)
    nacks: dict[Group, int] = field(default_factory=dict)
    subscribers: dict[str, Subscriber] = field(default_factory=dict)

    def opened(self, node: str, kind: str, cluster: str, version: str = "") -> Subscriber:
        sub = Subscriber(node, kind, cluster, version)
        self.subscribers[node] = sub
        return sub

    def closed(self, sub: Subscriber) -> None:
        # A proxy that reconnected has replaced its entry already: keep the new one.
        if self.subscribers.get(sub.node) is sub:
            del self.subscribers[sub.node]

    def acked(
        self,
        sub: Subscriber,
        version: str,
        published_at: float | None,
        opened_at: float,
        now: float,
        current: str | None = None,
        behind_since: float | None = None,
    ) -> float | None:
        """Record an ACK; returns the push latency (None if the version's publication time is
        no longer known: an ACK for a version older than the publisher's history). `current`:
        the replica's current version, for the lag (None: take the ACK as current);
        `behind_since`: when the version after the ACKed one was published, if known."""
        group = (sub.kind, sub.cluster)
        self.acks[group] = self.acks.get(group, 0) + 1
        sub.running(version, current, now, behind_since)
        sub.nacked = ""
        if published_at is None:
            sub.latency = None
            return None
        latency = max(0.0, now - max(published_at, opened_at))
        self.latency.setdefault(group, Histogram()).observe(latency)
        sub.latency = latency
        return latency

    def nacked(self, sub: Subscriber, rejected: str = "") -> None:
        group = (sub.kind, sub.cluster)
        self.nacks[group] = self.nacks.get(group, 0) + 1
        sub.nacked = rejected

    def behind(self, now: float, more_than: float = 0.0) -> list[Subscriber]:
        """Subscribers lagging more than `more_than` seconds, the worst first."""
        late = [s for s in self.subscribers.values() if s.lag(now) > more_than]
        return sorted(late, key=lambda s: (-s.lag(now), s.node))
