"""The rig's restart policy, pure: when a process that died is started again.

Modelled on the kubelet's pod `restartPolicy` and CrashLoopBackOff:

    policy   Always: every recorded process that dies is started again with its argv.
             Never:  a dead process stays dead (what fault-injection tests and bench/chaos.py
                     want: a killed gateway must stay killed for as long as they measure).
    backoff  the n-th consecutive death (n = 0, 1, 2, ...) waits 0, base, 2*base, 4*base, ...
             seconds, capped at `backoff_max` (kubelet: 10 s doubling to 5 min; the rig starts
             at 1 s with a 10 s cap, because its processes start in about a second).
    reset    a process that ran `2 * backoff_max` seconds since its last start counts as
             healthy again: its next death restarts it at once (kubelet resets after 10 min,
             twice its cap).

A stopped process (SIGSTOP: state T) is not dead and is not restarted; the kubelet would need a
liveness probe to notice it, and the rig has none. `OnFailure` is not offered: the rig does not
reap the processes a CLI run started, so it cannot tell an exit code from a kill.

This module reads no clock and starts nothing: `Backoff.on_death(name, now)` says when the
restart is due, and `on_start(name, now)` records that it happened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from clusters.rig.errors import RigError

ALWAYS = "Always"
NEVER = "Never"
POLICIES = (ALWAYS, NEVER)
DEFAULT_BACKOFF_BASE = 1.0
DEFAULT_BACKOFF_MAX = 10.0
POLICY_FILE = "restart-policy.json"


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    policy: str = NEVER
    backoff_max: float = DEFAULT_BACKOFF_MAX
    backoff_base: float = DEFAULT_BACKOFF_BASE

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise RigError(f"restart policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if not 0 < self.backoff_base <= self.backoff_max:
            raise RigError(
                f"restart backoff: need 0 < base ({self.backoff_base:g} s) <= "
                f"max ({self.backoff_max:g} s)"
            )

    @property
    def restarts(self) -> bool:
        return self.policy == ALWAYS

    def delay(self, consecutive: int) -> float:
        """Seconds to wait before the restart after `consecutive` earlier quick deaths."""
        if consecutive <= 0:
            return 0.0
        return float(min(self.backoff_max, self.backoff_base * 2 ** (consecutive - 1)))

    @property
    def reset_after(self) -> float:
        return 2 * self.backoff_max


@dataclass(slots=True)
class _Track:
    started: float
    consecutive: int = 0
    due: float | None = None  # when dead: the time its restart is due


@dataclass(slots=True)
class Backoff:
    """Per-process backoff state of one supervisor (names are the rig's process names)."""

    policy: RestartPolicy
    _tracks: dict[str, _Track] = field(default_factory=dict)

    def on_death(self, name: str, now: float) -> float:
        """The process was seen dead at `now`: when its restart is due (idempotent while dead)."""
        track = self._tracks.setdefault(name, _Track(started=now))
        if track.due is None:
            if now - track.started >= self.policy.reset_after:
                track.consecutive = 0
            track.due = now + self.policy.delay(track.consecutive)
        return track.due

    def on_start(self, name: str, now: float) -> None:
        track = self._tracks.setdefault(name, _Track(started=now))
        track.consecutive += 1 if track.due is not None else 0
        track.started, track.due = now, None

    def forget(self, name: str) -> None:
        """The process left the rig (stopped on purpose): its history goes with it."""
        self._tracks.pop(name, None)

    def names(self) -> set[str]:
        return set(self._tracks)


NO_RESTARTS = RestartPolicy()


def policy_path(rigdir: Path) -> Path:
    return rigdir / POLICY_FILE


def save(rigdir: Path, policy: RestartPolicy) -> None:
    body = {"policy": policy.policy, "backoff_max": policy.backoff_max}
    policy_path(rigdir).write_text(json.dumps({**body, "backoff_base": policy.backoff_base}))


def load(rigdir: Path) -> RestartPolicy:
    """The rig's policy; `Never` for a rig brought up without one."""
    try:
        data = json.loads(policy_path(rigdir).read_text())
        return RestartPolicy(
            str(data["policy"]), float(data["backoff_max"]), float(data["backoff_base"])
        )
    except FileNotFoundError:
        return NO_RESTARTS
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RigError(f"{policy_path(rigdir)}: unreadable restart policy: {e}") from e
