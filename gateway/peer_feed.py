"""Peer-gateway health pushed to the cluster's own sidecars (wire format: mesh.peerhealth).

The gateway's pools know which peer gateways their probes and dials found down (gateway.pool;
a CONNECT to such a peer is refused at once with `Fedgate-Peer-Health: unreachable`). A refusal
tells only the sidecar whose call was refused, and only by failing that try; this feed tells
every local sidecar, before any call: each egress connection that asked
`GET /fedgate/v1/peer-health` (gateway.egress) is a subscriber, and `run` looks at the
dialers' peer state every `interval` seconds (0.2) and writes a report to every subscriber
when it changed, or every `HEARTBEAT` seconds when it did not. So a peer found down reaches
every sidecar ~0.2 s later, and a peer whose probes pass again (the pool re-dials a down peer
in the background and puts a new connection on probation until `healthy_threshold` probes are
answered) is taken back by every sidecar just as fast: no user call decides it.

Polling, not callbacks: the state lives in several pools and transports, each with its own
transitions; reading it 5 times a second while someone listens costs a few dict lookups and
needs no hook in them. A subscriber whose socket does not drain (`MAX_BUFFERED` unwritten
bytes) is dropped; it reconnects and gets the current state at once.

Each gateway worker process has its own pools, so a worker reports what its own dials and
probes found; sidecars' calls spread over the workers, so every worker dials the peers in use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from gateway.transport import StreamDialer
from mesh.peerhealth import HEARTBEAT, RESPONSE_HEAD, encode_report

_log = structlog.get_logger("fedgate.gateway.peers")

MAX_BUFFERED = 64 * 1024  # bytes a subscriber may leave unread before it is dropped


def unreachable_peers(dialers: Mapping[str, StreamDialer]) -> frozenset[str]:
    """The peer clusters some dialer's pool found unreachable (`gateway.pool.peer_health`)."""
    out: set[str] = set()
    for dialer in dialers.values():
        for cluster, peer in dialer.status().get("peers", {}).items():
            if peer.get("health") == "unreachable":
                out.add(cluster)
    return frozenset(out)


class PeerHealthFeed:
    def __init__(
        self,
        unreachable: Callable[[], frozenset[str]],
        interval: float = 0.2,
        heartbeat: float = HEARTBEAT,
        log: Any = _log,
    ) -> None:
        self._unreachable = unreachable
        self._interval = interval
        self._heartbeat = heartbeat
        self._log = log
        self._subscribers: set[asyncio.WriteTransport] = set()
        self._next_heartbeat = 0.0
        self.current: frozenset[str] = frozenset()
        self.seq = 0
        self.dropped = 0  # metric: subscribers dropped for not reading

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self, transport: asyncio.WriteTransport) -> None:
        """Answer the request and send the current state; reports follow on changes."""
        self.current = self._unreachable()
        transport.write(RESPONSE_HEAD + encode_report(self.current, self.seq))
        self._subscribers.add(transport)

    def unsubscribe(self, transport: asyncio.WriteTransport) -> None:
        self._subscribers.discard(transport)

    def poll(self, now: float) -> bool:
        """One look at the pools; True if a report went out."""
        current = self._unreachable()
        changed = current != self.current
        if not changed and now < self._next_heartbeat:
            return False
        if changed:
            self._log.info(
                "peer health changed",
                unreachable=sorted(current),
                back=sorted(self.current - current),
                subscribers=len(self._subscribers),
            )
        self.current = current
        self.seq += 1
        self._next_heartbeat = now + self._heartbeat
        report = encode_report(current, self.seq)
        for transport in list(self._subscribers):
            if transport.is_closing():
                self._subscribers.discard(transport)
            elif transport.get_write_buffer_size() > MAX_BUFFERED:
                self.dropped += 1
                self._subscribers.discard(transport)
                transport.abort()
            else:
                transport.write(report)
        return True

    async def run(self) -> None:
        """Poll while anyone listens; returns when the last subscriber left."""
        loop = asyncio.get_running_loop()
        while self._subscribers:
            await asyncio.sleep(self._interval)  # the polling period
            self.poll(loop.time())
