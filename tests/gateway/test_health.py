"""The probe state machine (`gateway.health`): thresholds, recovery, loss ratio, RTT smoothing.
Pure: times are passed in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.health import HealthSettings, ProbeHealth, State, silent

S = HealthSettings(probe_interval=1.0, unhealthy_threshold=3, healthy_threshold=2, window=10)


def run(h: ProbeHealth, outcomes: str, start: float = 0.0, rtt: float = 0.01) -> float:
    """Drive one probe per second: 'a' answered after `rtt`, 'm' missed. Returns the time."""
    now = start
    for o in outcomes:
        probe = h.tick(now)
        if o == "a":
            assert h.answered(probe, now + rtt)
        now += S.probe_interval
    h.expire(now)  # decides the last probe
    return now


def test_starts_healthy_and_stays_so_while_answered() -> None:
    h = ProbeHealth(S)
    assert h.healthy
    run(h, "aaaa")
    assert h.healthy
    assert h.changes() == []
    assert h.lost == 0
    assert h.answered_total == 4


def test_unhealthy_after_threshold_consecutive_misses_only() -> None:
    h = ProbeHealth(S)
    run(h, "amamma")  # never three in a row
    assert h.healthy
    assert h.changes() == []
    h2 = ProbeHealth(S)
    probe = h2.tick(0.0)
    h2.tick(1.0)  # 1st miss (probe unanswered when the next is due)
    h2.tick(2.0)  # 2nd
    assert h2.healthy
    assert h2.consecutive_misses == 2
    h2.tick(3.0)  # 3rd
    assert not h2.healthy
    assert h2.changes() == [State.UNHEALTHY]
    assert h2.changes() == []  # handed out once
    assert not h2.answered(probe, 3.5)  # a late answer for a lost probe is not counted


def test_recovery_needs_healthy_threshold_consecutive_answers() -> None:
    h = ProbeHealth(S)
    run(h, "mmm")
    assert h.changes() == [State.UNHEALTHY]
    t = run(h, "a", start=10.0)
    assert not h.healthy  # one answer is not enough
    t = run(h, "m", start=t)
    run(h, "a", start=t)
    assert not h.healthy  # the miss restarted the count
    run(h, "aa", start=t + 10)
    assert h.healthy
    assert h.changes() == [State.HEALTHY]


def test_probation_counts_the_handshake_as_the_first_answer() -> None:
    h = ProbeHealth(S)
    h.start_probation()
    assert not h.healthy
    probe = h.tick(0.0)
    h.answered(probe, 0.002)
    assert h.healthy
    assert h.changes() == [State.HEALTHY]
    one = ProbeHealth(HealthSettings(healthy_threshold=1))
    one.start_probation()
    assert one.healthy


def test_loss_ratio_over_the_recent_window() -> None:
    h = ProbeHealth(S)
    assert h.loss_ratio == 0.0
    run(h, "aaaaammaaa")  # 2 lost of 10
    assert h.loss_ratio == pytest.approx(0.2)
    run(h, "aaaaaaaaaa", start=20.0)  # the window slides past them
    assert h.loss_ratio == 0.0
    assert h.lost == 2
    assert h.sent == h.lost + h.answered_total


def test_rtt_is_smoothed_as_rfc6298() -> None:
    h = ProbeHealth(S)
    run(h, "a", rtt=0.010)
    assert h.rtt == pytest.approx(0.010)
    run(h, "a", start=5.0, rtt=0.090)
    assert h.last_rtt == pytest.approx(0.090)
    assert h.rtt == pytest.approx(0.010 + (0.090 - 0.010) / 8)
    # A single spike moves it by an eighth; a sustained change converges.
    run(h, "a" * 40, start=10.0, rtt=0.050)
    assert h.rtt == pytest.approx(0.050, rel=0.01)


def test_probes_faster_than_the_timeout_are_lost_only_after_it() -> None:
    """A short keepalive makes the driver probe more often; each probe still has its timeout."""
    h = ProbeHealth(S)  # timeout: the 1 s interval
    first = h.tick(0.0)
    for t in (0.25, 0.5, 0.75):
        h.tick(t)
    assert h.lost == 0
    assert h.answered(first, 0.8)  # late for a 0.25 s tick, in time for its timeout
    h.tick(1.999)  # the probes of 0.25 .. 0.75 s waited their full second: lost
    h.tick(2.0)
    assert h.lost == 3
    assert not h.healthy


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="probe_interval"):
        HealthSettings(probe_interval=0)
    with pytest.raises(ValueError, match="probe_timeout"):
        HealthSettings(probe_timeout=0)
    with pytest.raises(ValueError, match="unhealthy_threshold"):
        HealthSettings(unhealthy_threshold=0)
    with pytest.raises(ValueError, match="silence_timeout"):
        HealthSettings(silence_timeout=0)
    with pytest.raises(ValueError, match="suspect_timeout"):
        HealthSettings(suspect_timeout=-1)


@given(st.lists(st.booleans(), max_size=60))
def test_state_follows_the_last_run_of_outcomes(outcomes: list[bool]) -> None:
    """Whatever the history, the state is what the thresholds say of its tail."""
    h = ProbeHealth(S)
    run(h, "".join("a" if ok else "m" for ok in outcomes))
    state = State.HEALTHY
    misses = answers = 0
    for ok in outcomes:
        misses, answers = (0, answers + 1) if ok else (misses + 1, 0)
        if state is State.HEALTHY and misses >= S.unhealthy_threshold:
            state = State.UNHEALTHY
        elif state is State.UNHEALTHY and answers >= S.healthy_threshold:
            state = State.HEALTHY
    assert h.state is state
    assert 0.0 <= h.loss_ratio <= 1.0


class Recorder:
    """Stands in for the driver's structlog logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, object]]] = []

    def info(self, event: str, **fields: object) -> None:
        self.lines.append(("info", event, fields))

    def warning(self, event: str, **fields: object) -> None:
        self.lines.append(("warning", event, fields))


def test_close_reason_logs_each_transition_once_and_says_when_to_close() -> None:
    h, log = ProbeHealth(S), Recorder()
    run(h, "amm")
    assert h.close_reason(log) is None  # two misses: not yet
    assert log.lines == []
    run(h, "m", start=3.0)
    assert h.close_reason(log) == "unhealthy: 3 probes unanswered"
    assert [(lvl, ev) for lvl, ev, _ in log.lines] == [("warning", "tunnel connection unhealthy")]
    assert log.lines[0][2]["misses"] == 3
    run(h, "aa", start=4.0)  # recovered before the driver closed it
    assert h.close_reason(log) is None
    assert [(lvl, ev) for lvl, ev, _ in log.lines][1:] == [("info", "tunnel connection healthy")]


# --- silence and suspect probes -------------------------------------------------------------


def test_a_connection_carrying_streams_is_suspect_after_the_silence_timeout() -> None:
    assert silent(0.0, 0, 5.0, 1.0) == (False, None)  # no stream: nothing waits on the peer
    assert silent(0.0, 2, 0.5, 1.0) == (False, 1.0)  # look again when the silence is due
    assert silent(0.0, 2, 1.0, 1.0) == (True, 2.0)  # suspect; look again a timeout later
    # A timer may fire a clock tick early (`TIMER_SLACK`): that still counts as due.
    assert silent(0.0, 1, 0.998, 1.0)[0]
    assert silent(0.9, 1, 1.5, 1.0) == (False, 1.9)  # heard since: the clock restarted


def test_an_unanswered_suspect_probe_closes_the_connection_at_once() -> None:
    s = HealthSettings(suspect_timeout=0.5)
    h, log = ProbeHealth(s), Recorder()
    run(h, "a")  # a healthy link, now silent: t = 1.0
    probe = h.suspect(2.0)
    assert probe is not None
    assert h.suspect(2.1) is None  # one at a time
    assert h.suspect_expiry() == pytest.approx(2.5)
    h.expire(2.4)
    assert h.healthy
    assert h.close_reason(log) is None
    h.expire(2.5)
    assert not h.healthy  # 1 miss, not `unhealthy_threshold`: the silence was the evidence
    assert h.changes() == [State.UNHEALTHY]
    assert h.suspect_expiry() is None
    assert h.suspect(2.6) is None  # unhealthy already: nothing to check
    assert h.close_reason(log) == (
        "unhealthy: peer silent for 1s and a liveness probe unanswered for 0.5s"
    )


def test_an_answered_suspect_probe_proves_the_link_alive() -> None:
    h = ProbeHealth(HealthSettings(suspect_timeout=0.5))
    probe = h.suspect(1.0)
    assert probe is not None
    assert h.answered(probe, 1.02)
    h.expire(10.0)
    assert h.healthy
    assert h.close_reason(Recorder()) is None
    assert h.suspected == 1
    assert h.suspect(10.0) is not None  # the next silence may probe again


def test_a_periodic_probe_already_out_becomes_the_suspect_probe() -> None:
    """No extra PING: the probe in flight is judged with the short timeout, from its send."""
    h = ProbeHealth(HealthSettings(suspect_timeout=0.5))
    periodic = h.tick(1.0)  # timeout 1 s: due at 2.0
    assert h.suspect(1.2) is None  # nothing new to send
    assert h.suspected == 1
    assert h.suspect_expiry() == pytest.approx(1.5)
    assert h.answered(periodic, 1.3)  # the silence ends with its answer
    assert h.suspect_expiry() is None
    assert h.healthy
    late = h.tick(2.0)
    assert h.suspect(2.9) is None
    h.expire(2.9)  # already 0.9 s old: lost under the suspect timeout
    assert not h.answered(late, 2.95)
    assert not h.healthy
    assert h.close_reason(Recorder()) is not None


def test_a_suspect_probe_waits_two_round_trips_on_a_long_link() -> None:
    h = ProbeHealth(HealthSettings(suspect_timeout=0.5))
    run(h, "a", rtt=0.6)  # a 600 ms round trip
    probe = h.suspect(2.0)
    assert probe is not None
    assert h.suspect_expiry() == pytest.approx(2.0 + 1.2)
    h.expire(2.7)
    assert h.answered(probe, 2.6)  # answered after one round trip: not lost
    assert h.healthy


def test_a_connection_on_probation_is_not_suspected() -> None:
    h = ProbeHealth(S)
    h.start_probation()
    assert h.suspect(0.0) is None  # it carries no stream; its own probes decide
    assert h.close_reason(Recorder()) is None
