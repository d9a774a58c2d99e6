"""Active health checking of one pooled tunnel connection. Pure: no I/O, no clock; the driver
passes `now` (seconds, monotonic) in and sends the probes (`tls`: a mux PING; `quic`: a QUIC
PING, acknowledged by the peer's ACK).

The driver calls `tick(now)` every `probe_interval` (or more often, when a shorter keepalive
asks for it): it returns the id of a probe to send now, after counting as lost every probe
unanswered for `probe_timeout` (the interval by default: a probe not answered by the time the
next one is due is a miss), and `answered(id, now)` when an answer arrives. Rules, as Envoy's
active health checking (interval, timeout, unhealthy threshold, healthy threshold):

| state     | event                                   | next state |
|-----------|-----------------------------------------|------------|
| healthy   | answer                                  | healthy    |
| healthy   | `unhealthy_threshold` consecutive misses | unhealthy  |
| unhealthy | `healthy_threshold` consecutive answers  | healthy    |
| unhealthy | miss                                    | unhealthy (answers counted from zero) |

A connection starts healthy (its handshake just completed: that is an answered round trip)
unless put on probation (`start_probation`): the pool dials a peer it found unreachable on
probation, so a recovered path carries calls again only after `healthy_threshold` answered
probes (the handshake counts as the first). `changes()` hands out the transitions once each,
for the driver to act on (the pool stops placing streams on an unhealthy connection; the
driver closes it).

Suspicion (Envoy's HTTP/2 `connection_keepalive`: a PING with a short timeout that closes
the connection, here sent on demand): a connection that carries streams and has heard nothing
from the peer for `silence_timeout` is suspect (`silent`: a stream's header, or a request on a
stream already open, waits for an answer the periodic probes would declare lost only after
`unhealthy_threshold` misses). The driver then sends a liveness probe at once (`suspect(now)`,
one at a time) with `suspect_timeout` (or 2 round trips, if longer) to be answered. Its answer
proves the link alive (the peer is only slow to answer its streams); its loss makes the
connection unhealthy and `close_reason` says to close it now: its streams reset (a stream
still waiting for its reply is a connect failure, a request on an idle pooled connection one
that was never answered: both retried elsewhere by the sidecar), and the pool marks the peer
unreachable. `suspect_expiry()` says when that probe times out.

Figures: `rtt` is smoothed as TCP does (RFC 6298: 1/8 of each new sample); `loss_ratio` is the
share of lost probes among the last `window` that were decided (answered or lost).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["HealthSettings", "ProbeHealth", "State", "silent"]

RTT_GAIN = 0.125  # RFC 6298 alpha
SUSPECT_RTTS = 2.0  # a suspect link's liveness probe waits at least this many round trips
# Event-loop timers may fire up to a clock tick early (uvloop: 1 ms): a probe that waited its
# timeout less this counts as lost, else a due miss would wait for the next tick.
TIMER_SLACK = 0.005


class State(enum.Enum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """Active probes of each pooled tunnel connection (`tls` and `quic`)."""

    probe_interval: float = 1.0  # seconds between probes
    probe_timeout: float | None = None  # seconds a probe has to be answered; None: the interval
    unhealthy_threshold: int = 3  # consecutive misses that mark a connection unhealthy
    healthy_threshold: int = 2  # consecutive answers that bring it back
    window: int = 20  # probes the loss ratio is computed over
    # Seconds without a byte from the peer after which a connection carrying streams is suspect.
    silence_timeout: float = 1.0
    suspect_timeout: float = 0.5  # seconds a liveness probe of a suspect link has to be answered
    # Seconds a call waits for a tunnel dial (Envoy's cluster `connect_timeout`, for the call
    # only: the dial goes on to its handshake timeout for the next calls).
    dial_wait: float = 2.0

    def __post_init__(self) -> None:
        for name in ("probe_interval", "silence_timeout", "suspect_timeout", "dial_wait"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.probe_timeout is not None and self.probe_timeout <= 0:
            raise ValueError(f"probe_timeout must be > 0 seconds, got {self.probe_timeout}")
        for name in ("unhealthy_threshold", "healthy_threshold", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class ProbeHealth:
    """Probe bookkeeping and the healthy/unhealthy state of one connection (module doc)."""

    def __init__(self, settings: HealthSettings) -> None:
        self.settings = settings
        self.state = State.HEALTHY
        self.rtt: float | None = None  # smoothed, seconds
        self.last_rtt: float | None = None
        self.sent = 0
        self.answered_total = 0
        self.lost = 0
        self._outstanding: dict[int, tuple[float, float]] = {}  # probe id -> (sent, timeout)
        self._suspect: int | None = None  # the outstanding liveness probe of a suspect link
        self.suspected = 0  # metric: liveness probes sent on suspicion
        self._suspect_missed = False
        self._next_id = 1
        self._misses = 0  # consecutive
        self._answers = 0  # consecutive
        self._recent: deque[bool] = deque(maxlen=settings.window)  # True: answered
        self._changes: list[State] = []

    @property
    def healthy(self) -> bool:
        return self.state is State.HEALTHY

    @property
    def consecutive_misses(self) -> int:
        return self._misses

    @property
    def loss_ratio(self) -> float:
        if not self._recent:
            return 0.0
        return sum(not ok for ok in self._recent) / len(self._recent)

    @property
    def timeout(self) -> float:
        s = self.settings
        return s.probe_interval if s.probe_timeout is None else s.probe_timeout

    def tick(self, now: float) -> int:
        """A probe is due: count the timed-out ones as lost; return the id to send now."""
        self.expire(now)
        return self._send(now, self.timeout)

    def seed_rtt(self, sample: float) -> None:
        """A round-trip sample from the handshake (an upper bound: it took a few round
        trips), until the probes measure one: a suspect probe on a young connection to a far
        peer then waits long enough."""
        if self.rtt is None:
            self.rtt = self.last_rtt = sample

    def suspect(self, now: float) -> int | None:
        """The link is suspect (silent while carrying streams): a liveness probe must be
        answered within `suspect_timeout` or the connection turns unhealthy. A periodic probe
        already out becomes that probe (timed from when it was sent: no extra PING on an idle
        link, whose silence ends with that probe's answer); else returns the id of one to send
        now. None: nothing to send (one is out, or the connection is unhealthy anyway)."""
        self.expire(now)
        if self._suspect is not None or not self.healthy:
            return None
        self.suspected += 1
        if self._outstanding:
            probe = max(self._outstanding, key=lambda p: self._outstanding[p][0])
            sent, timeout = self._outstanding[probe]
            self._outstanding[probe] = (sent, min(timeout, self.suspect_timeout))
            self._suspect = probe
            return None
        self._suspect = self._send(now, self.suspect_timeout)
        return self._suspect

    @property
    def suspect_timeout(self) -> float:
        """`suspect_timeout`, or `SUSPECT_RTTS` round trips on a long link (the larger of the
        smoothed and the last sample, so a link that just slowed down is not judged dead)."""
        rtt = max(self.rtt or 0.0, self.last_rtt or 0.0)
        return max(self.settings.suspect_timeout, SUSPECT_RTTS * rtt)

    def _send(self, now: float, timeout: float) -> int:
        probe = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        self._outstanding[probe] = (now, timeout)
        self.sent += 1
        return probe

    def suspect_expiry(self) -> float | None:
        """When the outstanding liveness probe of a suspect link times out (None: none)."""
        if self._suspect is None:
            return None
        sent, timeout = self._outstanding[self._suspect]
        return sent + timeout

    def expire(self, now: float) -> None:
        """Count as lost, oldest first, the probes unanswered for their timeout."""
        late = [
            p
            for p, (sent, timeout) in self._outstanding.items()
            if sent + timeout - min(TIMER_SLACK, timeout / 10) <= now
        ]
        for probe in late:
            del self._outstanding[probe]
            self._missed(suspect=probe == self._suspect)

    def answered(self, probe: int, now: float) -> bool:
        """The answer to `probe` arrived; False if it is not one we wait for (late or unknown:
        already counted as lost)."""
        out = self._outstanding.pop(probe, None)
        if out is None:
            return False
        if probe == self._suspect:
            self._suspect = None
        sample = max(0.0, now - out[0])
        self.last_rtt = sample
        self.rtt = sample if self.rtt is None else self.rtt + RTT_GAIN * (sample - self.rtt)
        self.answered_total += 1
        self._recent.append(True)
        self._misses = 0
        self._answers += 1
        self._maybe_recover()
        return True

    def figures(self) -> dict[str, Any]:
        """For logs and status."""
        return {
            "state": self.state.value,
            "misses": self._misses,
            "loss_ratio": round(self.loss_ratio, 3),
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
        }

    def start_probation(self) -> None:
        """A fresh connection to a peer found unreachable: it carries calls again only after
        `healthy_threshold` answered probes (its handshake counts as the first)."""
        if self.state is State.HEALTHY and self.settings.healthy_threshold > 1:
            self.state = State.UNHEALTHY
            self._answers = 1
            self._misses = 0

    def changes(self) -> list[State]:
        """The state transitions since the last call, oldest first."""
        out, self._changes = self._changes, []
        return out

    def close_reason(self, log: Any) -> str | None:
        """What a driver does after each probe or answer: log the transitions since the last
        call (on `log`, a structlog logger) and return why the connection must be closed now
        (`unhealthy_threshold` consecutive misses, or the liveness probe of a suspect link
        missed), or None."""
        for state in self.changes():
            level = log.info if state is State.HEALTHY else log.warning
            level(f"tunnel connection {state.value}", **self.figures())
        if self._suspect_missed:
            return (
                f"unhealthy: peer silent for {self.settings.silence_timeout:g}s and a liveness "
                f"probe unanswered for {self.suspect_timeout:.2g}s"
            )
        if self._misses < self.settings.unhealthy_threshold:
            return None
        return f"unhealthy: {self._misses} probes unanswered"

    def _missed(self, *, suspect: bool = False) -> None:
        self.lost += 1
        self._recent.append(False)
        self._answers = 0
        self._misses += 1
        if suspect:
            self._suspect = None
            self._suspect_missed = True
        threshold = 1 if suspect else self.settings.unhealthy_threshold
        if self.state is State.HEALTHY and self._misses >= threshold:
            self.state = State.UNHEALTHY
            self._changes.append(State.UNHEALTHY)

    def _maybe_recover(self) -> None:
        if self.state is State.UNHEALTHY and self._answers >= self.settings.healthy_threshold:
            self.state = State.HEALTHY
            self._changes.append(State.HEALTHY)


def silent(
    last_heard: float, streams: int, now: float, silence_timeout: float
) -> tuple[bool, float | None]:
    """Whether a connection carrying `streams` that last heard from its peer at `last_heard`
    is suspect now, and when to look again (None: it carries no stream, nothing to watch)."""
    if not streams:
        return False, None
    due = last_heard + silence_timeout
    if due - min(TIMER_SLACK, silence_timeout / 10) <= now:
        return True, now + silence_timeout
    return False, due
