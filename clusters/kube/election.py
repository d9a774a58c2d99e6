"""Leader election over a `coordination.k8s.io/v1` Lease: the pure decision core.

The rules are client-go's `leaderelection` (kube-controller-manager, Linkerd and Istio use it):

* The Lease names its holder (`holderIdentity`, the pod name), for how long a holder's claim
  lasts (`leaseDurationSeconds`), and when it was last renewed. Remote clocks are not trusted:
  a candidate measures a holder's claim from when *it* last saw the record change
  (`observed_at`, local clock), not from `renewTime`.
* A candidate takes the Lease when nobody holds it, or when the record has not changed for
  `lease_duration` since it last saw it change; otherwise it waits (`retry_period`).
* The leader renews every `retry_period`. A leader that has not renewed successfully for
  `renew_deadline` (< `lease_duration`) stops leading on its own, before anyone else can take
  over: two leaders never act at once while clocks tick at the same rate.
* Every write names the `resourceVersion` read (optimistic concurrency): of two candidates
  racing for a free Lease, one gets `409 Conflict` and stays a follower.
* A leader that stops cleanly releases the Lease (empty holder, duration 1 s) so a follower
  takes over at its next try instead of after `lease_duration`.

States: follower --(write succeeded)--> leader --(renew failed past the deadline, another
holder seen, or released)--> follower.

This module does no I/O and reads no clock: the driver (`clusters.kube.lease`) feeds it what
it read and `now`, and performs the write it asks for.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

DEFAULT_LEASE_DURATION = 15.0
DEFAULT_RENEW_DEADLINE = 10.0
DEFAULT_RETRY_PERIOD = 2.0


@dataclass(frozen=True, slots=True)
class ElectionSettings:
    """Durations in seconds (client-go's defaults for kube-controller-manager)."""

    lease_duration: float = DEFAULT_LEASE_DURATION
    renew_deadline: float = DEFAULT_RENEW_DEADLINE
    retry_period: float = DEFAULT_RETRY_PERIOD

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs 0 < retry period < renew deadline < lease duration, got "
                f"{self.retry_period}, {self.renew_deadline}, {self.lease_duration}"
            )


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The Lease's spec as the election reads and writes it (times as the API's MicroTime
    strings: they are compared for change, never against our clock)."""

    holder: str = ""
    duration_seconds: int = 0
    acquire_time: str = ""
    renew_time: str = ""
    transitions: int = 0


@dataclass(frozen=True, slots=True)
class Observed:
    """A read Lease: its record and `resourceVersion`, or `None` when it does not exist."""

    record: LeaseRecord | None
    resource_version: str = ""


@dataclass(frozen=True, slots=True)
class Create:
    record: LeaseRecord


@dataclass(frozen=True, slots=True)
class Update:
    record: LeaseRecord
    resource_version: str


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to write: another replica holds the Lease."""


Action = Create | Update | Wait


class Elector:
    """One candidate's view of the election. `decide(observed, now, stamp)` says what to write
    (`stamp` is `now` as a MicroTime string); report the write's outcome with `succeeded`,
    `failed` (conflict or error alike: the next read decides again)."""

    def __init__(self, identity: str, settings: ElectionSettings | None = None) -> None:
        if not identity:
            raise ValueError("leader election needs a non-empty identity (the pod name)")
        self.identity = identity
        self.settings = settings or ElectionSettings()
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0
        self._renewed_at: float | None = None  # last successful write while leading

    def is_leader(self, now: float) -> bool:
        return (
            self._renewed_at is not None and now - self._renewed_at < self.settings.renew_deadline
        )

    @property
    def observed_holder(self) -> str:
        return self._observed.holder if self._observed is not None else ""

    def decide(self, observed: Observed, now: float, stamp: str) -> Action:
        record = observed.record
        if record is None:
            return Create(self._claim(None, stamp))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        held_by_other = record.holder not in ("", self.identity)
        if held_by_other:
            self._renewed_at = None  # someone else holds it: we are not leading
            if now - self._observed_at < max(record.duration_seconds, 0):
                return Wait()
        return Update(self._claim(record, stamp), observed.resource_version)

    def succeeded(self, written: LeaseRecord, now: float) -> None:
        self._observed, self._observed_at = written, now
        self._renewed_at = now if written.holder == self.identity else None

    def failed(self, now: float) -> None:
        """A write failed (409 Conflict or an API error). Leadership lasts until the renew
        deadline passes (`is_leader`), so one failed renewal does not step down."""

    def release(self, stamp: str) -> LeaseRecord | None:
        """The record that gives the Lease up, or None when we do not hold it."""
        if self._observed is None or self._observed.holder != self.identity:
            return None
        if self._renewed_at is None:  # already released, or never led
            return None
        self._renewed_at = None
        return replace(self._observed, holder="", duration_seconds=1, renew_time=stamp)

    def _claim(self, current: LeaseRecord | None, stamp: str) -> LeaseRecord:
        duration = max(1, round(self.settings.lease_duration))
        if current is not None and current.holder == self.identity:
            return replace(current, duration_seconds=duration, renew_time=stamp)
        transitions = current.transitions + 1 if current is not None else 0
        return LeaseRecord(self.identity, duration, stamp, stamp, transitions)
