"""The pure policy objects on their own: retry plans, outlier detection, limits, experiments,
priority loads. Time is a number passed in; randomness is seeded."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.model import (
    ConnectionPool,
    Fault,
    FaultAbort,
    FaultDelay,
    Mirror,
    OutlierDetection,
    Retries,
)
from mesh.routing import locality_tiers, priority_loads
from sidecar.traffic.experiments import fault_action, mirror_this
from sidecar.traffic.limits import PoolBudget
from sidecar.traffic.outlier import Ejected, OutlierDetector, Returned
from sidecar.traffic.retry import (
    CONNECT_FAILURE,
    DEFAULT_RETRIES,
    LOCAL,
    MAX_BACKOFF,
    MAX_REPLAYS,
    REFUSED,
    RESET,
    STATUS,
    TIMEOUT,
    Outcome,
    RetryPlan,
    retriable,
)

# --- retries ----------------------------------------------------------------------------------

CASES = [
    # condition, outcome, retried
    ("5xx", Outcome(STATUS, 500), True),
    ("5xx", Outcome(STATUS, 404), False),
    ("5xx", Outcome(CONNECT_FAILURE), True),
    ("5xx", Outcome(RESET), True),
    ("5xx", Outcome(TIMEOUT), True),
    ("gateway-error", Outcome(STATUS, 502), True),
    ("gateway-error", Outcome(STATUS, 500), False),
    ("gateway-error", Outcome(TIMEOUT), True),
    ("gateway-error", Outcome(CONNECT_FAILURE), False),
    ("reset", Outcome(RESET), True),
    ("reset", Outcome(STATUS, 503), False),
    ("connect-failure", Outcome(CONNECT_FAILURE), True),
    ("connect-failure", Outcome(RESET), False),
    ("5xx", Outcome(LOCAL), False),  # the sidecar refused: no upstream outcome to retry
]


@pytest.mark.parametrize(("condition", "outcome", "expected"), CASES)
def test_retry_conditions(condition: str, outcome: Outcome, expected: bool) -> None:
    assert retriable(Retries(1, retry_on=(condition,)), outcome) is expected


def test_retriable_status_codes_and_istio_default() -> None:
    codes = Retries(1, retry_on=("retriable-status-codes",), retriable_status_codes=(409,))
    assert retriable(codes, Outcome(STATUS, 409))
    assert not retriable(codes, Outcome(STATUS, 503))
    default = Retries(1)  # connect-failure,refused-stream,unavailable,cancelled,503
    assert retriable(default, Outcome(STATUS, 503))
    assert retriable(default, Outcome(CONNECT_FAILURE))
    assert retriable(default, Outcome(REFUSED))
    assert retriable(default, Outcome(STATUS, 200, grpc=14))  # unavailable
    assert retriable(default, Outcome(STATUS, 200, grpc=1))  # cancelled
    assert not retriable(default, Outcome(STATUS, 500))
    assert not retriable(default, Outcome(RESET))  # the server may have acted on it


def test_plan_counts_tries_and_backs_off_with_jitter_within_the_cap() -> None:
    plan = RetryPlan(Retries(3, retry_on=("5xx",)), None, 0.0, random.Random(1))
    waits = []
    for _ in range(4):
        plan.start_try(0.0)
        waits.append(plan.backoff(Outcome(STATUS, 503), 0.0))
    assert waits[3] is None  # 1 + 3 tries
    assert all(w is not None and 0 <= w <= MAX_BACKOFF for w in waits[:3])
    assert plan.tries == 4


def test_plan_never_retries_local_refusals_or_unreplayable_requests() -> None:
    plan = RetryPlan(Retries(3, retry_on=("5xx",)), None, 0.0, random.Random(1))
    plan.start_try(0.0)
    assert plan.backoff(Outcome(LOCAL), 0.0) is None
    plan.replayable = False
    assert plan.backoff(Outcome(STATUS, 503), 0.0) is None


def test_try_deadline_is_the_earlier_of_per_try_and_overall() -> None:
    plan = RetryPlan(Retries(5, per_try_timeout=0.3), 1.0, 100.0, random.Random(1))
    assert plan.start_try(100.0) == pytest.approx(100.3)
    assert plan.start_try(100.8) == pytest.approx(101.0)
    # No retry whose backoff would end past the overall deadline.
    assert plan.backoff(Outcome(TIMEOUT), 100.999) is None


def test_no_policy_means_istios_default_two_retries_and_no_deadline() -> None:
    plan = RetryPlan(None, None, 5.0, random.Random(1))
    assert plan.retries == DEFAULT_RETRIES
    assert plan.start_try(5.0) is None
    assert plan.backoff(Outcome(RESET), 5.0) is None  # not in Istio's default retryOn
    waits = []
    for _ in range(3):
        waits.append(plan.backoff(Outcome(CONNECT_FAILURE), 5.0))
        plan.start_try(5.0)
    assert [w is not None for w in waits] == [True, True, False]  # 1 + 2 tries
    assert plan.tries == 4


def test_unprocessed_tries_are_replayed_at_once_without_counting_as_retries() -> None:
    plan = RetryPlan(Retries(0), None, 0.0, random.Random(1))  # no retries at all
    for _ in range(MAX_REPLAYS):
        plan.start_try(0.0)
        assert plan.backoff(Outcome(REFUSED), 0.0) == 0.0
    plan.start_try(0.0)
    assert plan.backoff(Outcome(REFUSED), 0.0) is None  # bounded
    assert plan.tries == MAX_REPLAYS + 1
    # Still a retry of its own after replays, under a policy that allows one.
    plan = RetryPlan(Retries(1), None, 0.0, random.Random(1))
    plan.start_try(0.0)
    assert plan.backoff(Outcome(REFUSED), 0.0) == 0.0
    plan.start_try(0.0)
    assert plan.backoff(Outcome(STATUS, 503), 0.0) is not None
    plan.start_try(0.0)
    assert plan.backoff(Outcome(STATUS, 503), 0.0) is None
    # Never a body that cannot be sent again, never past the overall timeout.
    plan = RetryPlan(None, 1.0, 0.0, random.Random(1), replayable=False)
    plan.start_try(0.0)
    assert plan.backoff(Outcome(REFUSED), 0.0) is None
    plan = RetryPlan(None, 1.0, 0.0, random.Random(1))
    plan.start_try(0.0)
    assert plan.backoff(Outcome(REFUSED), 1.0) is None


# --- outlier detection ------------------------------------------------------------------------


def detector(**kw: float) -> OutlierDetector:
    cfg = OutlierDetection(
        consecutive_5xx_errors=int(kw.get("n", 3)),
        interval=kw.get("interval", 1.0),
        base_ejection_time=kw.get("base", 10.0),
        max_ejection_percent=kw.get("pct", 100.0),
    )
    return OutlierDetector(cfg, 0.0)


def test_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    d = detector()
    for _ in range(2):
        d.record("a", True, 0.0, 4)
    d.record("a", False, 0.0, 4)
    d.record("a", True, 0.0, 4)
    d.record("a", True, 0.0, 4)
    assert not d.is_ejected("a", 0.0)
    d.record("a", True, 0.5, 4)
    assert d.is_ejected("a", 0.5)
    assert d.events == [Ejected("a", 10.5, 3)]


def test_ejected_host_returns_at_the_first_tick_after_its_time_and_repeats_grow() -> None:
    d = detector(interval=1.0, base=10.0)
    for _ in range(3):
        d.record("a", True, 0.5, 4)
    assert d.is_ejected("a", 10.9)  # ejected until 10.5, returns at the tick of 11.0
    assert not d.is_ejected("a", 11.0)
    assert isinstance(d.events[-1], Returned)
    for _ in range(3):
        d.record("a", True, 11.0, 4)
    assert d.is_ejected("a", 30.9)  # second ejection: 2 x 10 s
    assert not d.is_ejected("a", 31.0)


def test_multiplier_decays_while_the_host_stays_healthy() -> None:
    d = detector(interval=1.0, base=10.0)
    for _ in range(3):
        d.record("a", True, 0.0, 4)
    assert not d.is_ejected("a", 10.0)
    # 10 healthy intervals later the multiplier is back to 0: the next ejection is 1 x base.
    for _ in range(3):
        d.record("a", True, 25.0, 4)
    assert d.is_ejected("a", 34.9)
    assert not d.is_ejected("a", 35.0)


def test_max_ejection_percent_but_always_one_host() -> None:
    d = detector(pct=10.0)
    for host in ("a", "b"):
        for _ in range(3):
            d.record(host, True, 0.0, 4)
    assert d.ejected(0.0) == frozenset({"a"})  # one host always; a second would be 50 %
    d = detector(pct=50.0)
    for host in ("a", "b", "c"):
        for _ in range(3):
            d.record(host, True, 0.0, 4)
    assert d.ejected(0.0) == frozenset({"a", "b"})


def test_results_of_an_ejected_host_are_ignored_and_forget_drops_state() -> None:
    d = detector()
    for _ in range(3):
        d.record("a", True, 0.0, 2)
    d.record("a", False, 1.0, 2)
    assert d.is_ejected("a", 1.0)
    d.forget(frozenset({"b"}))
    assert not d.is_ejected("a", 1.0)


# --- limits and experiments -------------------------------------------------------------------


def test_budget_refusals_name_the_limit() -> None:
    b = PoolBudget(ConnectionPool(1, 1, 2))
    assert b.start_request() is None
    assert b.start_request() is None
    refusal = b.start_request()
    assert refusal is not None
    assert refusal.reason == "max requests"
    assert b.may_open()
    b.opened()
    assert not b.may_open()
    assert b.start_waiting() is None
    waiting = b.start_waiting()
    assert waiting is not None
    assert waiting.reason == "pending overflow"
    b.configure(None)
    assert b.start_waiting() is None
    assert b.may_open()


def test_fault_and_mirror_draws_match_their_percentages() -> None:
    rng = random.Random(4)
    fault = Fault(FaultDelay(25, 1.5), FaultAbort(10, 503))
    actions = [fault_action(fault, rng) for _ in range(10_000)]
    assert sum(a.delay == 1.5 for a in actions) == pytest.approx(2500, abs=150)
    assert sum(a.abort == 503 for a in actions) == pytest.approx(1000, abs=100)
    assert fault_action(None, rng).delay == 0
    assert sum(mirror_this(Mirror(percentage=5), rng) for _ in range(10_000)) == pytest.approx(
        500, abs=70
    )
    assert not mirror_this(Mirror(percentage=0), rng)


# --- priority loads ---------------------------------------------------------------------------


def test_priority_loads_are_graded() -> None:
    assert priority_loads([1.0, 1.0, 1.0], 70) == (1.0, 0.0, 0.0)
    loads = priority_loads([0.5, 1.0], 70)
    assert loads == pytest.approx((0.5 / 0.7, 1 - 0.5 / 0.7))
    assert priority_loads([0.0, 0.5, 1.0], 70) == pytest.approx((0.0, 0.5 / 0.7, 1 - 0.5 / 0.7))
    # Together below 100 %: normalised.
    assert priority_loads([0.2, 0.1], 70) == pytest.approx((2 / 3, 1 / 3))
    assert priority_loads([0.0, 0.0], 70) == (0.0, 0.0)
    assert priority_loads([0.01, 1.0], 0) == (1.0, 0.0)


@given(st.lists(st.floats(0, 1), min_size=1, max_size=4), st.floats(0, 100))
def test_priority_loads_sum_to_one_or_zero(health: list[float], threshold: float) -> None:
    loads = priority_loads(health, threshold)
    total = sum(loads)
    assert total == pytest.approx(1.0) or (total == 0 and not any(health))
    assert all(load >= 0 for load in loads)


def test_locality_tiers() -> None:
    regions = {"east": "us-east", "north": "us-east", "west": "us-west", "x": ""}
    assert locality_tiers("east", regions, ["west", "north", "east", "x"]) == (
        ("east",),
        ("north",),
        ("west", "x"),
    )
    assert locality_tiers("x", regions, ["x", "east"]) == (("x",), ("east",))
