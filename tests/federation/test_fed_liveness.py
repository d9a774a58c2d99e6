"""Cluster liveness with flap damping: every row of the table, on a fake clock."""

from __future__ import annotations

import pytest

from federation.liveness import DETACHED, DOWN, LIVE, SUPPRESSED, DampingSettings, Liveness
from mesh.clock import FakeClock

# penalty 1000, suppress 1500, reuse 750, half-life 10 s, max hold 60 s; the damping rows are
# tested without the Detached grace (a lost lease removes at once), the grace rows below.
S = DampingSettings(detach_grace=0)
G = DampingSettings(detach_grace=30)


def test_a_lost_lease_detaches_the_cluster_which_stays_routed_for_the_grace() -> None:
    clock, live = FakeClock(), Liveness(G)
    live.observe({"east", "west"}, clock.now())
    clock.advance(1)
    assert live.observe({"east"}, clock.now()) == {"east", "west"}
    assert states(live) == {"east": LIVE, "west": DETACHED}
    assert live.detached() == {"west"}
    assert live.next_deadline() == clock.now() + 30
    clock.advance(29.9)
    assert live.observe({"east"}, clock.now()) == {"east", "west"}
    clock.advance(0.1)
    assert live.observe({"east"}, clock.now()) == {"east"}  # lease gone AND grace over
    record = live.record("west")
    assert record is not None
    assert (record.state, record.losses, record.merit) == (DOWN, 1, G.penalty)


def test_a_detached_cluster_that_returns_is_live_and_undamped() -> None:
    clock, live = FakeClock(), Liveness(G)
    live.observe({"west"}, clock.now())
    for _ in range(5):  # an agent restarting over and over: never removed, never damped
        clock.advance(1)
        assert live.observe(set(), clock.now()) == {"west"}
        clock.advance(1)
        assert live.observe({"west"}, clock.now()) == {"west"}
    record = live.record("west")
    assert record is not None
    assert (record.state, record.losses, record.merit) == (LIVE, 0, 0.0)
    assert live.next_deadline() is None


def states(live: Liveness) -> dict[str, str]:
    return {n: r.state for n, r in live.records().items()}


def test_a_new_cluster_is_routed_and_a_lost_one_leaves_at_once() -> None:
    clock, live = FakeClock(), Liveness(S)
    assert live.observe({"east", "west"}, clock.now()) == {"east", "west"}
    clock.advance(1)
    assert live.observe({"east"}, clock.now()) == {"east"}  # removal is never damped
    assert states(live) == {"east": LIVE, "west": DOWN}
    record = live.record("west")
    assert record is not None
    assert record.losses == 1
    assert record.merit == S.penalty


def test_one_loss_never_delays_the_return() -> None:
    clock, live = FakeClock(), Liveness(S)
    live.observe({"west"}, clock.now())
    clock.advance(1)
    live.observe(set(), clock.now())
    clock.advance(0.1)
    assert live.observe({"west"}, clock.now()) == {"west"}


def test_a_flapping_cluster_is_held_out_until_its_merit_decays() -> None:
    clock, live = FakeClock(), Liveness(S)
    live.observe({"west"}, clock.now())
    for _ in range(2):  # two losses 2 s apart: merit ~1870 >= suppress
        clock.advance(1)
        live.observe(set(), clock.now())
        clock.advance(1)
        live.observe({"west"}, clock.now())
    assert states(live) == {"west": SUPPRESSED}
    assert live.observe({"west"}, clock.now()) == frozenset()
    deadline = live.next_deadline()
    assert deadline is not None
    hold = deadline - clock.now()
    assert 5 < hold < 20  # log2(1870/750) * 10 s ~ 13 s
    clock.advance(hold - 0.5)
    assert live.observe({"west"}, clock.now()) == frozenset()
    clock.advance(1)
    assert live.observe({"west"}, clock.now()) == {"west"}
    assert states(live) == {"west": LIVE}


def test_losing_a_suppressed_cluster_adds_penalty_and_the_hold_is_capped() -> None:
    clock, live = FakeClock(), Liveness(S)
    live.observe({"west"}, clock.now())
    for _ in range(200):  # flapping for ever: 5 losses a second
        clock.advance(0.1)
        live.observe(set(), clock.now())
        clock.advance(0.1)
        live.observe({"west"}, clock.now())
    record = live.record("west")
    assert record is not None
    assert record.state == SUPPRESSED
    assert record.merit == pytest.approx(S.ceiling, rel=0.05)
    deadline = live.next_deadline()
    assert deadline is not None
    assert deadline - clock.now() <= S.max_hold + 0.01
    clock.advance(S.max_hold + 0.1)
    assert live.observe({"west"}, clock.now()) == {"west"}


def test_a_down_cluster_is_forgotten_once_its_merit_decays() -> None:
    clock, live = FakeClock(), Liveness(S)
    live.observe({"west"}, clock.now())
    clock.advance(1)
    live.observe(set(), clock.now())
    deadline = live.next_deadline()
    assert deadline is not None
    clock.advance(deadline - clock.now() + 0.1)
    live.observe(set(), clock.now())
    assert states(live) == {}
    assert live.next_deadline() is None


def test_restored_records_damp_the_same_way_on_another_replica() -> None:
    clock, leader = FakeClock(), Liveness(S)
    leader.observe({"west"}, clock.now())
    for _ in range(2):
        clock.advance(1)
        leader.observe(set(), clock.now())
        clock.advance(1)
        leader.observe({"west"}, clock.now())
    follower = Liveness(S)
    follower.restore(leader.persistable().values())
    clock.advance(2)
    assert follower.observe({"west"}, clock.now()) == leader.observe({"west"}, clock.now())
    assert follower.observe({"west"}, clock.now()) == frozenset()


def test_damping_can_be_disabled() -> None:
    clock, live = FakeClock(), Liveness(DampingSettings(penalty=0, detach_grace=0))
    live.observe({"west"}, clock.now())
    for _ in range(5):
        clock.advance(0.1)
        assert live.observe(set(), clock.now()) == frozenset()
        clock.advance(0.1)
        assert live.observe({"west"}, clock.now()) == {"west"}


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="half_life"):
        DampingSettings(half_life=0)
    with pytest.raises(ValueError, match="reuse"):
        DampingSettings(reuse=2000, suppress=1000)
