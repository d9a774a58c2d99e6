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

Figures: `rtt` is smoothed as TCP does (RFC 6298: 1/8 of each new sample); `loss_ratio` is the
share of lost probes among the last `window` that were decided (answered or lost).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["HealthSettings", "ProbeHealth", "State"]

RTT_GAIN = 0.125  # RFC 6298 alpha
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

    def __post_init__(self) -> None:
        if self.probe_interval <= 0:
            raise ValueError(f"probe_interval must be > 0 seconds, got {self.probe_interval}")
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
        self._outstanding: dict[int, float] = {}  # probe id -> sent at
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
        probe = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        self._outstanding[probe] = now
        self.sent += 1
        return probe

    def expire(self, now: float) -> None:
        """Count as lost, oldest first, the probes unanswered for their timeout."""
        limit = now - self.timeout + min(TIMER_SLACK, self.timeout / 10)
        for probe in [p for p, sent in self._outstanding.items() if sent <= limit]:
            del self._outstanding[probe]
            self._missed()

    def answered(self, probe: int, now: float) -> bool:
        """The answer to `probe` arrived; False if it is not one we wait for (late or unknown:
        already counted as lost)."""
        sent = self._outstanding.pop(probe, None)
        if sent is None:
            return False
        sample = max(0.0, now - sent)
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
        (`unhealthy_threshold` consecutive misses), or None."""
        for state in self.changes():
            level = log.info if state is State.HEALTHY else log.warning
            level(f"tunnel connection {state.value}", **self.figures())
        if self._misses < self.settings.unhealthy_threshold:
            return None
        return f"unhealthy: {self._misses} probes unanswered"

    def _missed(self) -> None:
        self.lost += 1
        self._recent.append(False)
        self._answers = 0
        self._misses += 1
        if self.state is State.HEALTHY and self._misses >= self.settings.unhealthy_threshold:
            self.state = State.UNHEALTHY
            self._changes.append(State.UNHEALTHY)

    def _maybe_recover(self) -> None:
        if self.state is State.UNHEALTHY and self._answers >= self.settings.healthy_threshold:
            self.state = State.HEALTHY
            self._changes.append(State.HEALTHY)
