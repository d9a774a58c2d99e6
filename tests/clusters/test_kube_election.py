"""The leader-election core: two electors wired to one in-memory Lease, on a fake clock."""

from __future__ import annotations

import pytest

from clusters.kube.election import (
    Create,
    ElectionSettings,
    Elector,
    LeaseRecord,
    Observed,
    Update,
    Wait,
)

S = ElectionSettings(lease_duration=15, renew_deadline=10, retry_period=2)


class Lease:
    """The API server's side: one Lease with resourceVersion checks."""

    def __init__(self) -> None:
        self.record: LeaseRecord | None = None
        self.rv = 0

    def read(self) -> Observed:
        return Observed(self.record, str(self.rv))

    def step(self, e: Elector, now: float) -> bool:
        """One round of `e` on a fresh read; True when its write went through."""
        return self.write(e, e.decide(self.read(), now, f"t{now}"), now)

    def write(self, e: Elector, action: Create | Update | Wait, now: float) -> bool:
        match action:
            case Wait():
                return False
            case Create(record) if self.record is None:
                pass
            case Update(record, rv) if rv == str(self.rv):
                pass
            case _:  # AlreadyExists / Conflict
                e.failed(now)
                return False
        self.record, self.rv = record, self.rv + 1
        e.succeeded(record, now)
        return True


def test_the_first_candidate_creates_the_lease_and_the_second_waits() -> None:
    lease, a, b = Lease(), Elector("a", S), Elector("b", S)
    assert lease.step(a, 0.0)
    assert a.is_leader(0.0)
    assert lease.record is not None
    assert lease.record.holder == "a"
    assert lease.record.duration_seconds == 15
    assert not lease.step(b, 1.0)
    assert not b.is_leader(1.0)
    assert b.observed_holder == "a"


def test_a_racing_write_with_a_stale_resource_version_loses() -> None:
    lease, a, b, c = Lease(), Elector("a", S), Elector("b", S), Elector("c", S)
    lease.step(a, 0.0)
    lease.record, lease.rv = a.release("t0.5"), lease.rv + 1
    seen = lease.read()
    act_b, act_c = b.decide(seen, 1.0, "t1"), c.decide(seen, 1.0, "t1")
    assert isinstance(act_b, Update)
    assert isinstance(act_c, Update)
    assert lease.write(c, act_c, 1.0)
    assert not lease.write(b, act_b, 1.0)  # the same resourceVersion, now stale: 409
    assert c.is_leader(1.0)
    assert not b.is_leader(1.0)
    assert not lease.step(b, 3.0)  # b reads c's claim and waits
    assert not b.is_leader(3.0)
    assert b.observed_holder == "c"


def test_a_follower_takes_over_only_after_the_lease_duration_without_renewal() -> None:
    lease, a, b = Lease(), Elector("a", S), Elector("b", S)
    lease.step(a, 0.0)
    lease.step(b, 0.5)  # b sees a's record first at 0.5
    # a stops renewing (crashed). b measures from when it saw the record change, not renewTime.
    for now in (2.5, 8.0, 15.4):
        assert not lease.step(b, now)
    assert not a.is_leader(10.0)  # a's own deadline passed before b may take over
    assert lease.step(b, 15.6)
    assert b.is_leader(15.6)
    assert lease.record is not None
    assert lease.record.holder == "b"
    assert lease.record.transitions == 1


def test_a_renewing_leader_keeps_the_lease() -> None:
    lease, a, b = Lease(), Elector("a", S), Elector("b", S)
    lease.step(a, 0.0)
    now = 0.0
    while now < 60:
        now += 2.0
        assert lease.step(a, now)
        assert a.is_leader(now)
        assert not lease.step(b, now + 1)
    assert lease.record is not None
    assert lease.record.acquire_time == "t0.0"


def test_a_leader_whose_renewals_fail_steps_down_at_the_renew_deadline() -> None:
    lease, a = Lease(), Elector("a", S)
    lease.step(a, 0.0)
    for now in (2.0, 4.0, 8.0):
        a.failed(now)
        assert a.is_leader(now)  # one failure is not a step-down
    assert not a.is_leader(10.0)


def test_release_hands_over_at_the_next_try() -> None:
    lease, a, b = Lease(), Elector("a", S), Elector("b", S)
    lease.step(a, 0.0)
    lease.step(b, 1.0)
    released = a.release("t2")
    assert released is not None
    assert released.holder == ""
    assert released.duration_seconds == 1
    lease.record, lease.rv = released, lease.rv + 1
    assert not a.is_leader(2.0)
    assert lease.step(b, 3.0)
    assert b.is_leader(3.0)
    assert b.release("t4") is not None
    assert a.release("t4") is None


def test_settings_must_order_the_durations() -> None:
    with pytest.raises(ValueError, match="retry period < renew deadline"):
        ElectionSettings(lease_duration=10, renew_deadline=10, retry_period=2)
    with pytest.raises(ValueError, match="identity"):
        Elector("", S)
