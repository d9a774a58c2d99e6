"""Outlier detection for one service, pure (Envoy's consecutive-5xx detector, Istio's fields).

- A host (local endpoint, or a remote cluster as one host) that fails `consecutive5xxErrors`
  times in a row is ejected at once, for `baseEjectionTime x n`, n being how many times it
  has been ejected (decremented for every `interval` it then stays in, as Envoy does).
- Failures are 5xx answers and locally observed errors (connect failure, reset, timeout);
  any other answer resets the host's count.
- Ejected hosts return at the first `interval` tick at or after their ejection ends.
- At most `maxEjectionPercent` of the service's hosts are ejected at once, but one host may
  always be (Envoy: "will eject at least one host regardless of the value").

State table per host (rows: state, columns: event):

| state | failure (count reaches threshold) | success | tick after ejection end |
|---|---|---|---|
| in | ejected (if the percentage allows), n += 1 | count = 0 | n -= 1 (floor 0) |
| ejected | ignored | ignored | in, count = 0 |

`now` comes from the caller (any monotonic clock); ticks are processed lazily, in closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mesh.model import OutlierDetection

MAX_EJECTION_TIME = 300.0  # Envoy's default cap on baseEjectionTime x n


@dataclass(slots=True)
class _Host:
    consecutive: int = 0
    ejections: int = 0  # n, the multiplier
    ejected_until: float | None = None  # ejection ends (the host returns at the next tick)
    last_tick: float = field(default=0.0)


@dataclass(frozen=True, slots=True)
class Ejected:
    host: str
    until: float
    consecutive: int


@dataclass(frozen=True, slots=True)
class Returned:
    host: str


Event = Ejected | Returned


class OutlierDetector:
    def __init__(self, config: OutlierDetection, now: float) -> None:
        self.config = config
        self._epoch = now  # ticks fall at epoch + k * interval
        self._hosts: dict[str, _Host] = {}
        self.events: list[Event] = []  # for the driver to log; it clears them

    def configure(self, config: OutlierDetection) -> None:
        """New settings (a config update); ejections in force are kept."""
        self.config = config

    def _tick_at_or_after(self, t: float) -> float:
        interval = max(self.config.interval, 1e-3)
        k = math.ceil((t - self._epoch) / interval - 1e-9)
        return self._epoch + max(k, 0) * interval

    def _ticks_between(self, after: float, upto: float) -> int:
        """Ticks in (after, upto]."""
        interval = max(self.config.interval, 1e-3)
        if upto <= after:
            return 0
        return math.floor((upto - self._epoch) / interval + 1e-9) - math.floor(
            (after - self._epoch) / interval + 1e-9
        )

    def _advance(self, name: str, h: _Host, now: float) -> None:
        if h.ejected_until is not None:
            back = self._tick_at_or_after(h.ejected_until)
            if back > now:
                h.last_tick = now
                return
            h.ejected_until = None
            h.consecutive = 0
            h.last_tick = back
            self.events.append(Returned(name))
        if h.ejections:
            h.ejections = max(0, h.ejections - self._ticks_between(h.last_tick, now))
        h.last_tick = now

    def is_ejected(self, host: str, now: float) -> bool:
        h = self._hosts.get(host)
        if h is None:
            return False
        self._advance(host, h, now)
        return h.ejected_until is not None

    def ejected(self, now: float) -> frozenset[str]:
        return frozenset(name for name in list(self._hosts) if self.is_ejected(name, now))

    def record(self, host: str, failed: bool, now: float, hosts_total: int) -> None:
        """The result of one try at `host`; `hosts_total`: the service's hosts right now."""
        h = self._hosts.setdefault(host, _Host(last_tick=now))
        self._advance(host, h, now)
        if h.ejected_until is not None:
            return  # a try that started before the ejection: no news
        if not failed:
            h.consecutive = 0
            return
        h.consecutive += 1
        if h.consecutive < self.config.consecutive_5xx_errors:
            return
        others = sum(1 for n in list(self._hosts) if n != host and self.is_ejected(n, now))
        share = 100.0 * (others + 1) / max(hosts_total, 1)
        if others and share > self.config.max_ejection_percent:
            return  # keep counting; ejection may become possible when another returns
        h.ejections += 1
        duration = min(self.config.base_ejection_time * h.ejections, MAX_EJECTION_TIME)
        h.ejected_until = now + duration
        self.events.append(Ejected(host, h.ejected_until, h.consecutive))
        h.consecutive = 0

    def forget(self, keep: frozenset[str]) -> None:
        """Drop state of hosts no longer in the service (endpoints gone from the catalog)."""
        for name in list(self._hosts):
            if name not in keep:
                del self._hosts[name]
