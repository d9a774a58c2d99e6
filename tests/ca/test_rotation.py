"""The root rotation plan (pure): states, publication over time, retirement, the manifest."""

from __future__ import annotations

import datetime as dt

import pytest

from ca.errors import RotationError
from ca.rotation import ACTIVE, PENDING, RETIRING, RootEntry, RootPlan, plan_from_json, plan_to_json

T0 = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
TTL = dt.timedelta(seconds=20)
GRACE = dt.timedelta(seconds=5)


def s(n: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=n)


def ids(entries: tuple[RootEntry, ...]) -> list[str]:
    return [e.id for e in entries]


def test_full_rotation_publishes_both_then_only_the_new_root() -> None:
    plan = RootPlan.single("old", T0, TTL)
    assert ids(plan.published(T0)) == ["old"]

    plan = plan.prepare("new", s(1))
    assert plan.active.id == "old"  # pending: published, not issuing
    assert plan.pending is not None
    assert plan.pending.id == "new"
    assert ids(plan.published(s(1))) == ["old", "new"]

    plan = plan.activate("new", s(10), GRACE)
    assert plan.active.id == "new"
    old = plan.entry("old")
    assert old is not None
    assert old.state == RETIRING
    assert old.retire_at == s(10) + TTL + GRACE  # every SVID "old" signed has expired by then
    assert ids(plan.published(s(34.9))) == ["new", "old"]  # active first
    assert plan.next_change(s(11)) == s(35)
    assert ids(plan.published(s(35))) == ["new"]
    assert plan.next_change(s(35)) is None

    pruned, gone = plan.prune(s(36))
    assert gone == ("old",)
    assert [r.id for r in pruned.roots] == ["new"]


def test_second_prepare_while_pending_is_refused() -> None:
    plan = RootPlan.single("a", T0, TTL).prepare("b", T0)
    with pytest.raises(RotationError, match="already pending"):
        plan.prepare("c", T0)


def test_activate_needs_a_pending_root() -> None:
    plan = RootPlan.single("a", T0, TTL)
    with pytest.raises(RotationError, match="not pending"):
        plan.activate("a", T0)
    with pytest.raises(RotationError, match="not pending"):
        plan.activate("zzz", T0)


def test_abort_drops_the_pending_root_only() -> None:
    plan = RootPlan.single("a", T0, TTL).prepare("b", T0).abort()
    assert ids(plan.published(T0)) == ["a"]
    with pytest.raises(RotationError, match="no rotation is pending"):
        plan.abort()


def test_two_rotations_in_a_row_keep_exactly_one_active() -> None:
    plan = RootPlan.single("a", T0, TTL).prepare("b", T0).activate("b", s(1))
    plan = plan.prepare("c", s(2)).activate("c", s(3))
    assert plan.active.id == "c"
    assert [r.state for r in plan.roots] == [RETIRING, RETIRING, ACTIVE]


def test_invariants_are_checked() -> None:
    with pytest.raises(RotationError, match="exactly one active"):
        RootPlan(TTL, (RootEntry("a", PENDING, T0),))
    with pytest.raises(RotationError, match="retire_at"):
        RootEntry("a", RETIRING, T0)
    with pytest.raises(RotationError, match="unknown state"):
        RootEntry("a", "gone", T0)


def test_manifest_round_trip_and_errors() -> None:
    plan = RootPlan.single("a", T0, TTL).prepare("b", s(1)).activate("b", s(2), GRACE)
    assert plan_from_json(plan_to_json(plan)) == plan
    with pytest.raises(RotationError, match="version"):
        plan_from_json({"version": 2})
    with pytest.raises(RotationError, match="maxSvidTtlSeconds"):
        plan_from_json({"version": 1, "maxSvidTtlSeconds": 0, "roots": []})
    bad_time = plan_to_json(plan)
    bad_time["roots"][0]["added"] = "2026-11-25T12:00:00"  # no zone
    with pytest.raises(RotationError, match="time zone"):
        plan_from_json(bad_time)
