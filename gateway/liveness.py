"""Silence watch and on-demand liveness probes of one client tunnel connection: the asyncio
glue both pooled transports (`tls`, `quic`) share. The rules are `gateway.health`'s (`silent`,
`ProbeHealth.suspect`); this module only keeps the timers and calls back.

Why: a silently dropped WAN (no RST, no ICMP) leaves every connection to the peer looking
healthy until `unhealthy_threshold` periodic probes are missed (3-4 s with the defaults, 6 s
seen on a loaded machine). Meanwhile a call waits: for its stream's reply, or, on an inner
connection the sidecar pooled (a stream opened long ago), for the response to a request just
written; the caller's own timeout may end it first. Here a connection that carries streams
and has heard nothing from the peer for `silence_timeout` sends a liveness probe at once;
unanswered within `suspect_timeout`, the driver closes the connection (`close_reason`): its
streams reset, which the sidecar retries on another cluster (a connect failure, or a request
on a pooled connection that got no response byte), and the pool marks the peer unreachable
for every sidecar (`gateway.peer_feed`). So such a call pays ~1.5 s, not its timeout.

Not here: the periodic probes (each driver's keepalive timer), closing the connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sized

from gateway.health import ProbeHealth, silent

# A probe timer that fires this late means our own loop was stalled: the answer may be read
# but not yet processed (libuv runs due timers before polling I/O), so judge after one more
# turn of the loop, not now.
LATE = 0.05
RECHECK = 0.01

# uvloop's clock has millisecond resolution; the probes' RTTs want better (`gateway.health`).
_clock = time.monotonic


class LinkWatch:
    """One client connection's silence watch and suspect probes (module docstring)."""

    def __init__(
        self,
        health: ProbeHealth,
        send_ping: Callable[[int], None],
        streams: Sized,
        on_verdict: Callable[[], object],
    ) -> None:
        """`send_ping(id)`: send a probe now; `streams`: the connection's open streams;
        `on_verdict()`: a probe timed out (the driver acts on `health.close_reason`)."""
        self._health = health
        self._send_ping = send_ping
        self._streams = streams
        self._on_verdict = on_verdict
        self.last_heard = _clock()  # the driver sets it at every receive
        self._silence_timer: asyncio.TimerHandle | None = None
        self._probe_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def opened(self) -> None:
        """A stream was opened: watch the silence while the connection carries streams."""
        if self._silence_timer is None:
            self._arm_silence(self.last_heard + self._health.settings.silence_timeout)

    def suspect(self) -> None:
        """Check the link now: a liveness probe with the short timeout."""
        probe = self._health.suspect(_clock())
        if probe is not None:
            self._send_ping(probe)
        self._arm_probe()  # also when a periodic probe already out became the suspect one

    def cancel(self) -> None:
        for timer in (self._silence_timer, self._probe_timer):
            if timer is not None:
                timer.cancel()
        self._silence_timer = self._probe_timer = None

    def _arm_silence(self, at: float) -> None:
        delay = max(0.0, at - _clock())
        self._silence_timer = self._loop.call_later(delay, self._check_silence)

    def _check_silence(self) -> None:
        self._silence_timer = None
        timeout = self._health.settings.silence_timeout
        late, then = silent(self.last_heard, len(self._streams), _clock(), timeout)
        if late:
            self.suspect()
        if then is not None:
            self._arm_silence(then)

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
