"""When to renew an SVID, pure: at half life with jitter, retried with backoff until it expires.

| state    | event                            | next                                              |
|----------|----------------------------------|---------------------------------------------------|
| waiting  | `due(now)` is true               | the driver asks the CA (with the current SVID)    |
| any      | `renewed(now, not_after)`        | waiting; `renew_at` = now + life x (0.5 +- jitter)|
| any      | `failed(now)`                    | waiting; `renew_at` = now + backoff (1 s doubling |
|          |                                  | to 30 s, at most a quarter of the time left)      |
| any      | `expired(now)`                   | the driver falls back to the bootstrap credential |

The lifetime is measured from when the SVID was received, not from its notBefore: the CA
back-dates notBefore by minutes for clock skew, which would make a 20 s SVID look 5 min long.
Jitter spreads the renewals of workloads started together. The driver (fedgate/wiring.py) does
the I/O and the logging; this object only holds times and reads no clock.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

MIN_DELAY = 0.5  # seconds: never spin, even on a 1 s certificate


@dataclass(frozen=True, slots=True)
class RenewalPolicy:
    """`fraction` of the lifetime at which to renew, +- `jitter` (both fractions of it);
    retries after a failure start at `retry_initial` seconds and double up to `retry_max`."""

    fraction: float = 0.5
    jitter: float = 0.1
    retry_initial: float = 1.0
    retry_max: float = 30.0

    def __post_init__(self) -> None:
        if not (self.fraction - self.jitter > 0 and self.fraction + self.jitter < 1):
            raise ValueError("renewal fraction +- jitter must stay inside (0, 1)")
        if not 0 < self.retry_initial <= self.retry_max:
            raise ValueError("retry delays must be positive and initial <= max")


class RenewalSchedule:
    def __init__(
        self,
        received: dt.datetime,
        not_after: dt.datetime,
        policy: RenewalPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy or RenewalPolicy()
        self._rng = rng or random.Random()
        self.not_after = not_after
        self.renew_at = self._pick(received, not_after)
        self.failures = 0
        self._backoff = self.policy.retry_initial

    def _pick(self, received: dt.datetime, not_after: dt.datetime) -> dt.datetime:
        p = self.policy
        life = max(not_after - received, dt.timedelta(0))
        share = self._rng.uniform(p.fraction - p.jitter, p.fraction + p.jitter)
        return received + life * share

    def delay(self, now: dt.datetime) -> float:
        """Seconds to wait before the next attempt (at least MIN_DELAY)."""
        return max(MIN_DELAY, (self.renew_at - now).total_seconds())

    def due(self, now: dt.datetime) -> bool:
        return now >= self.renew_at

    def seconds_left(self, now: dt.datetime) -> float:
        return (self.not_after - now).total_seconds()

    def expired(self, now: dt.datetime) -> bool:
        return now >= self.not_after

    def renewed(self, now: dt.datetime, not_after: dt.datetime) -> None:
        self.not_after = not_after
        self.renew_at = self._pick(now, not_after)
        self.failures = 0
        self._backoff = self.policy.retry_initial

    def failed(self, now: dt.datetime) -> float:
        """Record a failed attempt; returns the seconds until the next one."""
        self.failures += 1
        left = self.seconds_left(now)
        wait = self._backoff if left <= 0 else min(self._backoff, max(MIN_DELAY, left / 4))
        self._backoff = min(self._backoff * 2, self.policy.retry_max)
        self.renew_at = now + dt.timedelta(seconds=wait)
        return wait
