"""The renewal schedule (pure, fake clock): half life with jitter, backoff, expiry."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from ca.renewal import MIN_DELAY, RenewalPolicy, RenewalSchedule

T0 = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_renews_between_40_and_60_percent_of_the_lifetime() -> None:
    rng = random.Random(7)
    times = [RenewalSchedule(T0, T0 + HOUR, rng=rng).renew_at for _ in range(200)]
    assert min(times) >= at(0.4 * 3600)
    assert max(times) <= at(0.6 * 3600)
    assert max(times) - min(times) > dt.timedelta(minutes=5)  # jitter spreads them


def test_lifetime_counts_from_receipt_not_from_the_backdated_not_before() -> None:
    # A 20 s SVID received at T0 (its notBefore is minutes earlier): renew near T0 + 10 s.
    sched = RenewalSchedule(T0, at(20), RenewalPolicy(jitter=0.0))
    assert sched.renew_at == at(10)
    assert sched.delay(T0) == 10
    assert not sched.due(at(9.9))
    assert sched.due(at(10))


def test_success_reschedules_from_the_new_certificate() -> None:
    sched = RenewalSchedule(T0, at(20), RenewalPolicy(jitter=0.0))
    sched.failed(at(10))
    sched.renewed(at(11), at(31))
    assert sched.renew_at == at(21)
    assert sched.failures == 0
    assert sched.not_after == at(31)


def test_failures_back_off_and_stay_before_expiry() -> None:
    sched = RenewalSchedule(T0, at(3600), RenewalPolicy(jitter=0.0, retry_max=30))
    waits = [sched.failed(at(1800 + i)) for i in range(7)]
    assert waits == [1, 2, 4, 8, 16, 30, 30]
    assert sched.failures == 7
    # Close to expiry, retries come at most a quarter of the time left apart.
    assert sched.failed(at(3590)) == pytest.approx(2.5)
    assert sched.seconds_left(at(3590)) == 10
    assert not sched.expired(at(3599))
    assert sched.expired(at(3600))


def test_after_expiry_retries_continue_with_backoff() -> None:
    sched = RenewalSchedule(T0, at(20), RenewalPolicy(jitter=0.0, retry_initial=1, retry_max=4))
    assert [sched.failed(at(30 + i)) for i in range(4)] == [1, 2, 4, 4]
    assert sched.seconds_left(at(40)) == -20


def test_delay_never_spins() -> None:
    sched = RenewalSchedule(T0, at(20), RenewalPolicy(jitter=0.0))
    assert sched.delay(at(100)) == MIN_DELAY


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="inside"):
        RenewalPolicy(fraction=0.5, jitter=0.5)
    with pytest.raises(ValueError, match="retry"):
        RenewalPolicy(retry_initial=10, retry_max=1)
