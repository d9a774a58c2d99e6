"""Remote clusters the local gateway said it cannot reach, as a routing health input. Pure.

The egress gateway dials and probes its peer gateways; when it cannot open a tunnel to a peer
cluster (no connection, failed handshake, the link died), its CONNECT refusal says so
(`Fedgate-Peer-Health: unreachable`, mesh.connect). The sidecar then treats that cluster as
unhealthy for `DOWN_SECONDS`, for every service and whatever the policy (outlier detection is
per service and optional): routing avoids it, locality failover spills past it, retries go
elsewhere. After `DOWN_SECONDS` a call may try it again; a refusal that repeats extends it. A
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
        self.marked = 0  # metric: refusals that marked a cluster down

    def mark_down(self, cluster: str, now: float) -> None:
        self._down_until[remote_host(cluster)] = now + self._down_seconds
        self.marked += 1

    def healthy(self, host: str, now: float) -> bool:
        until = self._down_until.get(host)
        if until is None:
            return True
        if now >= until:
            del self._down_until[host]
            return True
        return False

    def down(self, now: float) -> list[str]:
        """The clusters avoided now (for status)."""
        hosts = [h for h in list(self._down_until) if not self.healthy(h, now)]
        return sorted(h.removeprefix(remote_host("")) for h in hosts)
