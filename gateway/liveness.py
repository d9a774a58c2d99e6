"""The stream-open deadline and on-demand liveness probes of one client tunnel connection: the
asyncio glue both pooled transports (`tls`, `quic`) share. The rules are `gateway.health`'s
(`overdue`, `ProbeHealth.suspect`); this module only keeps the timers and calls back.

Why: a silently dropped WAN (no RST, no ICMP) leaves every connection to the peer looking
healthy until `unhealthy_threshold` periodic probes are missed (3-4 s with the defaults), and
a call whose stream was opened meanwhile waits for a reply that never comes; the caller's own
timeout may end it before the connection is declared dead. Here a stream whose reply is
`open_timeout` late sends a liveness probe at once; unanswered within `suspect_timeout`, the
connection turns unhealthy and `on_unhealthy` runs (the driver refuses the streams still waiting
for their reply, a connect failure the sidecar retries elsewhere, and the pool marks the peer
unreachable for every sidecar, `gateway.peer_feed`). So a call pays ~1.5 s, not its timeout.

Not here: the periodic probes (each driver's keepalive timer), closing the connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from gateway.health import ProbeHealth, overdue
from gateway.transport import BaseStream

# A probe timer that fires this late means our own loop was stalled: the answer may be read
# but not yet processed (libuv runs due timers before polling I/O), so judge after one more
# turn of the loop, not now.
LATE = 0.05
RECHECK = 0.01

# uvloop's clock has millisecond resolution; the probes' RTTs want better (`gateway.health`).
_clock = time.monotonic


class LinkWatch:
    """One client connection's open deadline and suspect probes (module docstring)."""

    def __init__(
        self,
        health: ProbeHealth,
        send_ping: Callable[[int], None],
        streams: Callable[[], Iterable[BaseStream]],
        on_verdict: Callable[[], object],
    ) -> None:
        """`send_ping(id)`: send a probe now; `streams()`: the connection's open streams;
        `on_verdict()`: a probe timed out (the driver acts on health; what it returns is
        ignored)."""
        self._health = health
        self._send_ping = send_ping
        self._streams = streams
        self._on_verdict = on_verdict
        self._loop = asyncio.get_running_loop()
        self._failures = health.failures
        self._open_timer: asyncio.TimerHandle | None = None
        self._probe_timer: asyncio.TimerHandle | None = None

    def opened(self) -> float:
        """A stream was opened now (its header is sent next): returns its opening time, and
        arms the deadline if it is not armed yet."""
        now = _clock()
        if self._open_timer is None:
            self._arm_open(now + self._health.settings.open_timeout)
        return now

    def suspect(self) -> None:
        """Check the link now (e.g. the pool found a sibling connection dead)."""
        probe = self._health.suspect(_clock())
        if probe is None:
            return
        self._send_ping(probe)
        self._arm_probe()

    def failed(self) -> bool:
        """Whether the connection turned unhealthy by missed probes since the last call (once
        per turn; a connection on probation did not turn)."""
        turned, self._failures = self._health.failures != self._failures, self._health.failures
        return turned

    def refuse_opening(self, closing: str | None) -> None:
        """The connection turned unhealthy: refuse the streams still waiting for their reply
        (the caller sees the link fail under them: a connect failure, retried elsewhere)."""
        why = closing or (
            "peer gateway not answering: liveness probe unanswered for "
            f"{self._health.suspect_timeout:.2g}s"
        )
        for stream in [s for s in self._streams() if s.awaiting_reply]:
            stream._on_abort(why)

    def cancel(self) -> None:
        for timer in (self._open_timer, self._probe_timer):
            if timer is not None:
                timer.cancel()
        self._open_timer = self._probe_timer = None

    def _arm_open(self, at: float) -> None:
        self._open_timer = self._loop.call_later(max(0.0, at - _clock()), self._check_opens)

    def _check_opens(self) -> None:
        self._open_timer = None
        now = _clock()
        opening = [s.opened_at for s in self._streams() if s.awaiting_reply]
        late, then = overdue(opening, now, self._health.settings.open_timeout)
        if late:
            self.suspect()
            # A late stream still waiting after the probe's answer is looked at again one
            # deadline later (its peer is slow, or the link died since).
            again = now + self._health.settings.open_timeout
            then = again if then is None else min(then, again)
        if then is not None:
            self._arm_open(then)

    def _arm_probe(self) -> None:
        at = self._health.suspect_expiry()
        if at is None or self._probe_timer is not None:
            return
        self._probe_timer = self._loop.call_later(max(0.0, at - _clock()), self._expire, at)

    def _expire(self, due: float) -> None:
        self._probe_timer = None
        now = _clock()
        if now - due > LATE:
            # Our loop was stalled: let it read what arrived meanwhile before judging.
            self._probe_timer = self._loop.call_later(RECHECK, self._expire, now)
            return
        self._health.expire(now)
        self._on_verdict()
        self._arm_probe()
