"""Remote clusters the local gateway cannot reach, as a routing health input. Pure.

Two signals, both from the cluster's own egress gateway, which dials and probes its peer
gateways:

- **The peer-health feed** (mesh.peerhealth, read by sidecar.peer_watch): the gateway pushes
  the set of peer clusters its probes and dials found down, at once and at every change. While
  the feed is connected it decides: a listed cluster is unhealthy for every service and
  whatever the policy; a cluster is taken back when a report no longer lists it, i.e. when
  the gateway's probes pass again (Envoy's active health checking: a host is re-admitted by
  its health checks, never by a user request).
- **A refused CONNECT** (`Fedgate-Peer-Health: unreachable`, mesh.connect): the gateway found
  the peer down before the feed said so (or there is no feed). The cluster is unhealthy until
  the feed's next report that does not list it, and without a feed for `DOWN_SECONDS`, after
  which a call may try it again; a refusal that repeats extends it.

Routing avoids an unhealthy cluster, locality failover spills past it, retries go elsewhere. A
cluster that is the only choice is still used (the balancer's panic mode), so a wrong verdict
costs at most the detour, never an outage.
"""

from __future__ import annotations

from sidecar.traffic.balance import remote_host

DOWN_SECONDS = 5.0


class PeerHealth:
    def __init__(self, down_seconds: float = DOWN_SECONDS) -> None:
        self._down_seconds = down_seconds
        self._down_until: dict[str, float] = {}  # remote host key -> monotonic deadline
        self._reported: frozenset[str] = frozenset()  # remote host keys the feed lists
        self.feed = False  # the gateway's peer-health feed is connected
        self.marked = 0  # metric: refusals that marked a cluster down
        self.reports = 0  # metric: feed reports taken in

    def mark_down(self, cluster: str, now: float) -> None:
        self._down_until[remote_host(cluster)] = now + self._down_seconds
        self.marked += 1

    def report(self, unreachable: frozenset[str]) -> None:
        """The gateway's current view (a feed report): it replaces every refusal mark."""
        self.feed = True
        self.reports += 1
        self._reported = frozenset(remote_host(c) for c in unreachable)
        self._down_until.clear()

    def feed_lost(self, now: float) -> None:
        """The feed ended: what it listed stays avoided for `DOWN_SECONDS` (refusal rules)."""
        self.feed = False
        for host in self._reported:
            self._down_until[host] = max(self._down_until.get(host, 0.0), now + self._down_seconds)
        self._reported = frozenset()

    def healthy(self, host: str, now: float) -> bool:
        if host in self._reported:
            return False
        until = self._down_until.get(host)
        if until is None:
            return True
        if self.feed or now < until:  # with a feed, only its next report takes it back
            return False
        del self._down_until[host]
        return True

    def down(self, now: float) -> list[str]:
        """The clusters avoided now (for status)."""
        hosts = set(self._reported) | {
            h for h in list(self._down_until) if not self.healthy(h, now)
        }
        return sorted(h.removeprefix(remote_host("")) for h in hosts)
