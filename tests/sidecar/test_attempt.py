"""The request-attempt core (`sidecar.traffic.attempt`) driven by hand: results and `now` in,
commands out. Time is a plain float (a fake clock); nothing sleeps and nothing is dialled."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import telemetry as tm
from mesh.model import ClusterWeight, Mirror, OutlierDetection, Retries
from sidecar.routes import RouteTable, ServiceRoute
from sidecar.traffic.attempt import (
    MIRROR_TIMEOUT,
    Answer,
    Answered,
    Attempts,
    Failure,
    Respond,
    Retry,
    Try,
)
from sidecar.traffic.balance import Balancer, remote_host
from sidecar.traffic.match import NO_POLICY, Effective, effective
from sidecar.traffic.outlier import Ejected, OutlierDetector
from sidecar.traffic.peers import PeerHealth
from sidecar.traffic.record import GRPC_STATUS, RequestRecord
from sidecar.traffic.retry import CONNECT_FAILURE, LOCAL, MAX_BACKOFF, RESET, TIMEOUT, Outcome
from sidecar.traffic.retry import REFUSED as REFUSED_STREAM
from tests.sidecar.conftest import cluster, endpoint, snapshot

VIP = "127.77.0.10"
EAST_EPS = (endpoint("east", "10.1.0.5", "payments-0"), endpoint("east", "10.1.0.6", "payments-1"))
WEST_EPS = (endpoint("west", "10.2.0.5", "payments-w0"),)
WEST = remote_host("west")
REFUSED = Failure(Outcome(CONNECT_FAILURE), 503, "upstream connect failure", "refused")
RESET_503 = Failure(Outcome(RESET), 503, "upstream reset", "response: connection lost")


def route(
    eps: tuple[object, ...] = EAST_EPS + WEST_EPS, weights: tuple[tuple[str, int], ...] = ()
) -> ServiceRoute:
    clusters = (cluster("east", ("127.0.0.1", 15443)), cluster("west", ("127.0.0.1", 25443)))
    table = RouteTable.build(
        snapshot(clusters=clusters, endpoints=eps, weights=weights),  # type: ignore[arg-type]
        "east",
    )
    found = table.lookup(VIP, 8080)
    assert found is not None
    return found


def attempts(
    eff: Effective, now: float = 100.0, r: ServiceRoute | None = None, **kw: object
) -> Attempts:
    return Attempts(r or route(), eff, random.Random(7), now, **kw)  # type: ignore[arg-type]


def first(a: Attempts, now: float = 100.0) -> Try:
    step = a.next_try(now)
    assert isinstance(step, Try), step
    return step


def test_one_try_that_answers_is_streamed_within_the_overall_deadline() -> None:
    a = attempts(Effective(timeout=2.0))
    t = first(a)
    assert (t.number, t.deadline) == (1, 102.0)
    step = a.tried(Answered(200), 100.3)
    assert step == Respond(t.target, 102.0)
    rec = a.record
    assert (rec.status, rec.retries, rec.reason) == (200, 0, "")
    assert rec.dst_cluster == t.target.cluster
    assert rec.endpoint == (t.target.endpoint.address if t.target.endpoint else "")


def test_a_retry_goes_to_another_host_and_says_why() -> None:
    retries = Retries(2, retry_on=("connect-failure", "5xx"))
    a = attempts(Effective(retries=retries))
    hosts = []
    step: Retry | Respond | Answer | None = None
    for result in (REFUSED, Answered(503)):
        t = first(a)
        hosts.append(t.target.host)
        step = a.tried(result, 100.0)
        assert isinstance(step, Retry), step
        assert step.attempt == t.number
        assert step.host == t.target.host
        assert 0 <= step.backoff <= MAX_BACKOFF
    assert isinstance(step, Retry)
    assert step.span_event() == (
        "retry",
        {"attempt": 2, "host": hosts[1], "why": "status 503"},
    )
    t = first(a)
    assert len({*hosts, t.target.host}) == 3  # every try on a host not tried before
    assert isinstance(a.tried(Answered(200), 100.1), Respond)
    assert (a.record.retries, a.record.status) == (2, 200)


def test_a_failed_remote_cluster_is_not_tried_again_by_the_same_request() -> None:
    r = route(EAST_EPS[:1] + WEST_EPS, weights=(("west", 99), ("east", 1)))
    eff = replace(effective(r.policy, None), retries=Retries(1))
    for seed in range(20):
        a = Attempts(r, eff, random.Random(seed), 0.0)
        t = first(a, 0.0)
        if t.target.host != WEST:
            continue
        assert isinstance(a.tried(REFUSED, 0.0), Retry)
        assert first(a, 0.1).target.cluster == "east"  # the previous-hosts predicate


def test_a_retry_never_goes_to_a_cluster_the_weights_keep_at_zero() -> None:
    # Istio: a destination without weight gets no traffic, retries included.
    r = route(EAST_EPS[:1] + WEST_EPS, weights=(("west", 100),))
    eff = replace(effective(r.policy, None), retries=Retries(1))
    for seed in range(20):
        a = Attempts(r, eff, random.Random(seed), 0.0)
        assert first(a, 0.0).target.host == WEST
        assert isinstance(a.tried(REFUSED, 0.0), Retry)
        assert first(a, 0.1).target.host == WEST


def test_a_retry_goes_to_another_cluster_when_the_weights_give_one_a_share() -> None:
    # Two live local endpoints, one remote cluster, 70 % local / 30 % remote: after a local
    # endpoint failed, the retry goes west (another endpoint *and* cluster), whatever the draw.
    r = route(weights=(("local", 70), ("remote", 30)))
    eff = effective(r.policy, None)
    retried_to = set()
    for seed in range(40):
        a = Attempts(r, eff, random.Random(seed), 0.0)  # no policy retries: Istio's default
        t = first(a, 0.0)
        assert isinstance(a.tried(REFUSED, 0.0), Retry)
        second = first(a, 0.0)
        assert second.target.cluster != t.target.cluster, seed
        retried_to.add(second.target.cluster)
    assert retried_to == {"east", "west"}  # first tries went both ways


def test_a_retry_stays_in_the_cluster_when_the_weights_keep_others_at_zero() -> None:
    r = route(weights=(("local", 100),))
    eff = effective(r.policy, None)
    for seed in range(20):
        a = Attempts(r, eff, random.Random(seed), 0.0)
        t = first(a, 0.0)
        assert isinstance(a.tried(REFUSED, 0.0), Retry)
        second = first(a, 0.0)
        assert second.target.cluster == "east"
        assert second.target.host != t.target.host  # another endpoint, still


def test_without_a_policy_a_request_gets_two_retries_on_istios_conditions() -> None:
    a = attempts(NO_POLICY)
    first(a)
    assert isinstance(a.tried(RESET_503, 100.0), Answer)  # reset: not in the default retryOn
    a = attempts(NO_POLICY)
    for _ in range(2):
        first(a)
        assert isinstance(a.tried(Answered(503), 100.0), Retry)
    first(a)
    assert a.tried(Answered(503), 100.0) == Respond(a.target, None)  # type: ignore[arg-type]
    assert a.record.retries == 2


def test_an_unprocessed_try_is_replayed_even_without_retries() -> None:
    a = attempts(Effective(retries=Retries(0)))
    t = first(a)
    step = a.tried(Failure(Outcome(REFUSED_STREAM), 503, "upstream reset", "GOAWAY"), 100.0)
    assert isinstance(step, Retry)
    assert step.backoff == 0.0
    assert first(a).number == t.number + 1
    assert isinstance(a.tried(Answered(200), 100.0), Respond)


def test_last_failure_is_answered_with_its_status_and_recorded() -> None:
    a = attempts(Effective(retries=Retries(1)))
    first(a)
    assert isinstance(a.tried(REFUSED, 100.0), Retry)
    t = first(a)
    step = a.tried(RESET_503, 100.0)
    assert step == Answer(503, "upstream reset", "response: connection lost", True)
    assert (a.record.status, a.record.reason, a.record.retries) == (503, "upstream reset", 1)
    assert a.record.dst_cluster == t.target.cluster


def test_per_try_deadline_is_the_earlier_and_backoff_never_passes_the_overall() -> None:
    retries = Retries(5, per_try_timeout=0.5, retry_on=("reset",))
    a = attempts(Effective(retries=retries, timeout=1.2))
    assert first(a, 100.0).deadline == 100.5
    timeout = Failure(Outcome(TIMEOUT), 504, "upstream timeout", "response not done")
    assert isinstance(a.tried(timeout, 100.5), Retry)
    assert first(a, 100.6).deadline == pytest.approx(101.1)
    assert isinstance(a.tried(timeout, 101.1), Retry)
    assert first(a, 101.15).deadline == 101.2  # the overall deadline comes first
    # At the overall deadline no backoff fits: the timeout is the answer.
    assert a.tried(timeout, 101.2) == Answer(504, "upstream timeout", "response not done", True)


def test_refusals_unreplayable_requests_and_unlisted_statuses_are_not_retried() -> None:
    eff = Effective(retries=Retries(3))  # Istio's default conditions: connect-failure,reset,503
    pending = Failure(Outcome(LOCAL), 503, "pending overflow", "1 queued, limit 1")
    a = attempts(eff)
    first(a)
    assert a.tried(pending, 100.0) == Answer(503, "pending overflow", "1 queued, limit 1", True)
    a = attempts(eff, replayable=False)
    first(a)
    assert isinstance(a.tried(REFUSED, 100.0), Answer)
    a = attempts(eff)
    first(a)
    assert isinstance(a.tried(REFUSED, 100.0, replayable=False), Answer)  # streamed meanwhile
    a = attempts(eff)
    first(a)
    assert isinstance(a.tried(Answered(500), 100.0), Respond)


def test_a_grpc_trailers_only_status_is_retried_by_its_condition() -> None:
    a = attempts(Effective(retries=Retries(1, retry_on=("unavailable",))))
    first(a)
    step = a.tried(Answered(200, grpc=14), 100.0)
    assert isinstance(step, Retry)
    assert (step.reason, step.detail) == ("retryable status", "status 200, grpc-status 14")
    first(a)
    assert isinstance(a.tried(Answered(200, grpc=0), 100.0), Respond)
    assert a.record.grpc_status == 0


def test_no_route_is_answered_before_any_try() -> None:
    a = attempts(Effective(), r=route(eps=()))
    step = a.next_try(100.0)
    assert isinstance(step, Answer)
    assert (step.status, step.reason, step.upstream_failed) == (503, "no route", False)
    assert (a.record.status, a.record.reason) == (503, "no route")


def test_out_of_turn_calls_are_driver_bugs() -> None:
    a = attempts(Effective())
    with pytest.raises(AssertionError):
        a.tried(Answered(200), 100.0)
    first(a)
    with pytest.raises(AssertionError):
        a.next_try(100.0)
    a.tried(Answered(200), 100.0)
    with pytest.raises(AssertionError):
        a.next_try(100.0)


def test_outcomes_are_reported_to_outlier_detection_and_ejected_hosts_avoided() -> None:
    od = OutlierDetection(consecutive_5xx_errors=2, interval=1.0, base_ejection_time=30.0)
    r = route(EAST_EPS)
    detector = OutlierDetector(od, 0.0)
    bad = EAST_EPS[0].address
    now = 0.0
    while len([e for e in detector_events(r, detector, bad, now)]) == 0:
        now += 0.1
        assert now < 10, "never ejected"
    assert detector.is_ejected(bad, now + 1)
    for seed in range(20):
        a = Attempts(r, Effective(), random.Random(seed), now + 1, outlier=detector)
        assert first(a, now + 1).target.host != bad
    # A local refusal says nothing of the host.
    a = Attempts(r, Effective(), random.Random(1), now + 1, outlier=detector)
    t = first(a, now + 1)
    a.tried(Failure(Outcome(LOCAL), 503, "max requests", ""), now + 1)
    assert not a.outlier_events
    assert not detector.is_ejected(t.target.host, now + 1)


def detector_events(
    r: ServiceRoute, detector: OutlierDetector, bad: str, now: float
) -> list[Ejected]:
    """One request whose first try fails if it lands on `bad`; the ejections it reported."""
    a = Attempts(r, Effective(), random.Random(int(now * 10)), now, outlier=detector)
    t = first(a, now)
    a.tried(RESET_503 if t.target.host == bad else Answered(200), now)
    return [e for e in a.outlier_events if isinstance(e, Ejected)]


def test_a_cluster_the_gateway_cannot_reach_is_avoided() -> None:
    peers = PeerHealth(down_seconds=5.0)
    peers.mark_down("west", 0.0)
    r = route(EAST_EPS + WEST_EPS, weights=(("west", 100),))
    eff = effective(r.policy, None)
    a = Attempts(r, eff, random.Random(3), 1.0, peers=peers)
    assert first(a, 1.0).target.cluster == "east"
    a = Attempts(r, eff, random.Random(3), 6.0, peers=peers)
    assert first(a, 6.0).target.cluster == "west"  # the verdict expired


def test_mirror_goes_where_the_policy_says_with_its_own_deadline() -> None:
    a = attempts(Effective(mirror=Mirror(cluster="west", percentage=100.0)))
    assert a.mirror()
    t = a.mirror_try(100.0)
    assert (t.target.host, t.deadline) == (WEST, 100.0 + MIRROR_TIMEOUT)
    a = attempts(Effective(mirror=Mirror(cluster="west"), timeout=3.0))
    assert a.mirror_try(100.0).deadline == 103.0
    assert not attempts(Effective()).mirror()


def test_the_record_says_what_the_span_and_the_metrics_report() -> None:
    rec = RequestRecord(status=200, dst_cluster="west", retries=1, grpc_status=0)
    attrs = rec.span_attributes("payments.shop.svc.clusterset.local")
    assert attrs == {
        tm.SERVICE: "payments.shop.svc.clusterset.local",
        tm.DESTINATION_CLUSTER: "west",
        tm.RETRIES: 1,
        tm.STATUS: 200,
        GRPC_STATUS: 0,
    }
    assert (rec.span_error(), rec.code) == ("", "200")
    assert RequestRecord(status=503).span_error() == "status 503"
    assert RequestRecord(status=503, reason="no route").span_error() == "no route"
    assert (RequestRecord().span_error(), RequestRecord().code) == ("no response", "0")


# -- retries elsewhere, as a property ------------------------------------------------------------

CLUSTERS = ("east", "west", "north")


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.tuples(*(st.integers(0, 3) for _ in CLUSTERS)),
    weights=st.lists(st.tuples(st.sampled_from(CLUSTERS), st.integers(0, 100)), max_size=3),
    tried=st.sets(st.sampled_from(CLUSTERS)),
    seed=st.integers(0, 1000),
)
def test_a_retry_leaves_tried_clusters_for_weighted_ones_and_never_for_unweighted(
    sizes: tuple[int, ...],
    weights: list[tuple[str, int]],
    tried: set[str],
    seed: int,
) -> None:
    by_cluster = {
        c: tuple(endpoint(c, f"10.{i}.0.{j + 1}", f"{c}-{j}") for j in range(n))
        for i, (c, n) in enumerate(zip(CLUSTERS, sizes, strict=True))
    }
    if not any(by_cluster.values()):
        return
    balancer = Balancer("east", by_cluster, {})
    eff = Effective(cluster_weights=tuple(ClusterWeight(c, w) for c, w in weights))
    # What an earlier try of the request failed on: east's first endpoint, others as one host.
    exclude = frozenset(
        (by_cluster[c][0].address if c == "east" else remote_host(c))
        for c in tried
        if by_cluster[c]
    )
    target = balancer.pick(eff, random.Random(seed), exclude=exclude)

    def weighted(c: str) -> bool:
        return not weights or any(w > 0 and name == c for name, w in weights)

    def fresh(c: str) -> bool:  # a host in `c` no try has failed on
        return any(
            (e.address if c == "east" else remote_host(c)) not in exclude for e in by_cluster[c]
        )

    untried = [c for c in CLUSTERS if by_cluster[c] and c not in tried and weighted(c)]
    if untried:
        assert target.cluster in untried  # another endpoint *and* cluster
    elif any(by_cluster[c] and weighted(c) for c in CLUSTERS):
        assert weighted(target.cluster)  # never to a cluster the weights keep at 0
        if any(by_cluster[c] and weighted(c) and fresh(c) for c in CLUSTERS):
            assert fresh(target.cluster)  # and to a host not tried, when one is left
