"""Traffic experiments, pure: fault injection (delay, abort) and mirroring decisions.

Percentages are 0..100 with decimals; each request draws independently from the injected
`random.Random`, so over n requests the share is binomial around the configured value.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mesh.model import Fault, Mirror


@dataclass(frozen=True, slots=True)
class FaultAction:
    delay: float = 0.0  # seconds to hold the request before routing it
    abort: int = 0  # status to answer with instead of routing (0: none)


NO_FAULT = FaultAction()


def _hit(percentage: float, rng: random.Random) -> bool:
    return percentage > 0 and rng.random() * 100.0 < percentage


def fault_action(fault: Fault | None, rng: random.Random) -> FaultAction:
    """Draw delay and abort independently, as Envoy's fault filter does."""
    if fault is None:
        return NO_FAULT
    delay = fault.delay.fixed_delay if fault.delay and _hit(fault.delay.percentage, rng) else 0.0
    abort = fault.abort.http_status if fault.abort and _hit(fault.abort.percentage, rng) else 0
    return FaultAction(delay, abort)


def mirror_this(mirror: Mirror | None, rng: random.Random) -> bool:
    return mirror is not None and _hit(mirror.percentage, rng)
