"""Traffic policy on the rig, with real curl: each feature committed to the GitOps repository
the way an operator would, then measured from the east client pod.

Service `web.demo` (HTTP, port 8080) runs the echo workload in five pods: east web-1, web-2
(version v1) and web-3 (v2), west web-w1 (v1) and web-w2 (v2). Labels travel from the rig's
file source through the agent, etcd, the controller and the config stream to the client's
sidecar. Echo's fail ratio is set at run time on 127.0.0.1 inside its pod
(`/__echo/fail-ratio/<r>`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clusters.rig import bringup, control, lifecycle
from mesh.model import ServicePort
from tests.e2e import policy_rig
from tests.e2e.conftest import rig_command
from tests.e2e.policy_rig import SUBSETS, run_in_pod, start_workload
from tests.helpers import until_sync

pytestmark = pytest.mark.rig

URL = "http://web.demo.svc.clusterset.local:8080"
PODS = (("east", "web-1", "v1"), ("east", "web-2", "v1"), ("east", "web-3", "v2"))
REMOTES = (("west", "web-w1", "v1"), ("west", "web-w2", "v2"))
WEST = ("web-w1", "web-w2")


@dataclass(frozen=True)
class Answer:
    status: int
    seconds: float
    pod: str
    reason: str


def _sh(rig: Path, cluster: str, pod: str, script: str, timeout: float) -> str:
    return run_in_pod(rig, cluster, pod, ["sh", "-c", script], timeout)


def curl(
    rig: Path, n: int, path: str = "/", header: str = "", parallel: bool = False
) -> list[Answer]:
    """`n` requests from east/client with curl (one process each), in turn or all at once."""
    fmt = "%{http_code} %{time_total} %header{x-fedgate-pod} %header{x-fedgate-reason}\\n"
    h = f"-H '{header}'" if header else ""
    one = f"curl -s --noproxy '*' --max-time 10 -o /dev/null {h} -w '{fmt}' '{URL}{path}'"
    if parallel:
        script = f"for i in $(seq {n}); do {one} & done; wait"
    else:
        script = f"for i in $(seq {n}); do {one} || echo '000 0 - curl failed'; done"
    out = _sh(rig, "east", "client", script, timeout=30 + n * 0.5)
    answers = []
    for line in out.splitlines():
        code, secs, pod, reason = ([*line.split(" ", 3), "", "", "", ""])[:4]
        answers.append(Answer(int(code), float(secs), pod, reason))
    assert len(answers) == n, out
    return answers


def echo(rig: Path, cluster: str, pod: str, path: str) -> dict[str, float]:
    out = _sh(
        rig, cluster, pod, f"curl -s --noproxy '*' --max-time 5 http://127.0.0.1:8080{path}", 10
    )
    data: dict[str, float] = json.loads(out)
    return data


def set_fail_ratio(rig: Path, pod: str, ratio: float) -> None:
    echo(rig, "east", pod, f"/__echo/fail-ratio/{ratio}")


def client_status(rig: Path) -> dict[str, object]:
    status = bringup.sidecar_config(rig, "east", "client")["status"]
    assert isinstance(status, dict)
    http = status["http"]
    assert isinstance(http, dict)
    return http


def apply_policy(rig: Path, spec: str) -> None:
    policy_rig.apply_policy(rig, "web", spec)


@pytest.fixture(scope="module")
def web(rig: Path) -> Iterator[Path]:
    fedgate = rig_command().fedgate

    def workload(cluster: str, pod: str) -> list[str]:
        return [*fedgate, "echo", "--cluster", cluster, "--pod", pod, "--port", "8080"]

    start_workload(rig, "web", (*PODS, *REMOTES), workload, [ServicePort("http", 8080, "HTTP")])
    seen = bringup.endpoints_seen(bringup.sidecar_config(rig, "east", "client"), "web", "demo")
    assert {e["pod"]: e.get("labels") for e in seen}["web-3"] == {"version": "v2"}
    yield rig
    policy_rig.remove_policy(rig, "web")


def pods(answers: list[Answer]) -> Counter[str]:
    return Counter(a.pod if a.status == 200 else str(a.status) for a in answers)


def ejected(rig: Path) -> list[str]:
    services = client_status(rig)["services"]
    assert isinstance(services, dict)
    found: list[str] = services["web.demo.svc.clusterset.local:8080"]["ejected"]
    return found


def wait_all_returned(rig: Path, within: float) -> float:
    """Poll the client sidecar until outlier detection has returned every host; the wait."""
    started = time.monotonic()
    until_sync(lambda: ejected(rig), within, check=lambda e: not e, what="no host ejected")
    return time.monotonic() - started


def share(answers: list[Answer], names: tuple[str, ...]) -> float:
    seen = pods(answers)
    return sum(seen[n] for n in names) / len(answers)


def test_canary_subset_at_ten_percent(web: Path) -> None:
    apply_policy(
        web,
        SUBSETS
        + """
clusterWeights: [{cluster: local, weight: 100}]
subsetWeights: [{subset: v1, weight: 90}, {subset: v2, weight: 10}]
""",
    )
    answers = curl(web, 400)
    seen = pods(answers)
    assert sum(seen[p] for p in ("web-1", "web-2", "web-3")) == 400, seen
    print(f"canary v2 share over 400 calls: {seen['web-3'] / 400:.3f}")
    # Binomial s.d. of the v2 share over 400 calls: 1.5 points; +-5 points is 3.3 s.d.
    assert 0.05 <= seen["web-3"] / 400 <= 0.15, seen


def test_a_subset_is_served_by_a_remote_cluster_running_mixed_versions(web: Path) -> None:
    # west runs v1 and v2: the call names the subset, west's ingress picks its v2 endpoint.
    apply_policy(
        web,
        SUBSETS
        + """
clusterWeights: [{cluster: west, weight: 100}]
subsetWeights: [{subset: v2, weight: 100}]
""",
    )
    assert pods(curl(web, 40)) == {"web-w2": 40}
    apply_policy(
        web,
        SUBSETS
        + """
clusterWeights: [{cluster: west, weight: 100}]
subsetWeights: [{subset: v1, weight: 100}]
""",
    )
    assert pods(curl(web, 40)) == {"web-w1": 40}


def test_retries_hide_an_endpoint_that_fails_half_its_requests(web: Path) -> None:
    apply_policy(
        web,
        """
clusterWeights: [{cluster: local, weight: 100}]
retries: {attempts: 3, retryOn: "5xx"}
""",
    )
    set_fail_ratio(web, "web-1", 0.5)
    try:
        answers = curl(web, 150)
        failed_before = echo(web, "east", "web-1", "/__echo/stats")["failed"]
    finally:
        set_fail_ratio(web, "web-1", 0.0)
    assert Counter(a.status for a in answers) == {200: 150}
    assert failed_before >= 10  # web-1 did fail; retries hid every failure


def test_per_try_and_overall_timeouts_fire_at_their_values(web: Path) -> None:
    apply_policy(
        web,
        """
clusterWeights: [{cluster: local, weight: 100}]
retries: {attempts: 2, perTryTimeout: 200ms, retryOn: "5xx"}
timeout: 5s
routes:
  - name: overall
    match: [{headers: {x-case: {exact: overall}}}]
    timeout: 300ms
    retries: {attempts: 0}
""",
    )
    [per_try] = curl(web, 1, "/delay/2000")
    assert (per_try.status, per_try.reason) == (504, "upstream timeout")
    # Three tries of 200 ms, plus backoff (at most 25 + 75 ms) and curl's own overhead.
    assert 0.6 <= per_try.seconds < 1.0, per_try
    [overall] = curl(web, 1, "/delay/2000", header="x-case: overall")
    assert (overall.status, overall.reason) == (504, "upstream timeout")
    assert 0.3 <= overall.seconds < 0.5, overall


def test_connection_pool_limit_answers_503_beyond_it(web: Path) -> None:
    apply_policy(
        web,
        """
clusterWeights: [{cluster: local, weight: 100}]
connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}
""",
    )
    answers = curl(web, 12, "/delay/600", parallel=True)
    codes = Counter(a.status for a in answers)
    # One request on the one connection, one queued; the rest are refused at once (a late
    # curl may find a place freed, hence a little slack).
    assert 2 <= codes[200] <= 4, codes
    assert codes[503] == 12 - codes[200], codes
    assert {a.reason for a in answers if a.status == 503} == {"pending overflow"}
    assert all(a.seconds < 0.5 for a in answers if a.status == 503)


def test_an_endpoint_with_consecutive_5xx_is_ejected_and_returns(web: Path) -> None:
    apply_policy(
        web,
        """
clusterWeights: [{cluster: local, weight: 100}]
outlierDetection: {consecutive5xxErrors: 3, interval: 500ms, baseEjectionTime: 3s,
                   maxEjectionPercent: 100}
retries: {attempts: 0}  # every failure shows (Istio retries by default)
""",
    )
    web2 = lifecycle.load(web).pod("east", "web-2")
    assert web2 is not None
    set_fail_ratio(web, "web-2", 1.0)
    try:
        answers = curl(web, 60)
        ejected_then = ejected(web)
    finally:
        set_fail_ratio(web, "web-2", 0.0)
    assert Counter(a.status for a in answers)[503] == 3  # exactly the three that ejected it
    assert ejected_then == [web2.ip]
    # Back after the base ejection time (3 s), at the next interval tick (every 500 ms).
    waited = wait_all_returned(web, 6.0)
    assert waited <= 3.6
    back = curl(web, 60)
    assert Counter(a.status for a in back) == {200: 60}
    assert pods(back)["web-2"] >= 5


def test_fault_delay_and_abort_at_their_percentages(web: Path) -> None:
    apply_policy(
        web,
        """
clusterWeights: [{cluster: local, weight: 100}]
fault:
  delay: {percentage: {value: 20}, fixedDelay: 100ms}
  abort: {percentage: {value: 25}, httpStatus: 418}
""",
    )
    answers = curl(web, 200)
    aborted = [a for a in answers if a.status == 418]
    # 25 % of 200 = 50, s.d. 6.1; 20 % delayed = 40, s.d. 5.7; bounds are ~3.5 s.d.
    assert 29 <= len(aborted) <= 71
    assert {a.reason for a in aborted} == {"fault abort"}
    delayed = sum(a.seconds >= 0.1 for a in answers)
    assert 20 <= delayed <= 60
    assert all(a.status in (200, 418) for a in answers)


def test_mirrored_traffic_arrives_at_the_mirror(web: Path) -> None:
    before = echo(web, "east", "web-3", "/__echo/stats")
    apply_policy(
        web,
        SUBSETS
        + """
clusterWeights: [{cluster: local, weight: 100}]
subsetWeights: [{subset: v1, weight: 100}]
mirror: {subset: v2, cluster: local}
mirrorPercentage: {value: 50}
""",
    )
    answers = curl(web, 100)
    assert set(pods(answers)) <= {"web-1", "web-2"}  # answers only from the primary
    deadline = time.monotonic() + 5
    while True:
        after = echo(web, "east", "web-3", "/__echo/stats")
        shadow = after["shadow"] - before["shadow"]
        if shadow >= 30 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert 30 <= shadow <= 70  # 50 % of 100 (s.d. 5)
    assert after["requests"] - before["requests"] == shadow  # the mirror got nothing else


def test_failover_spills_to_the_remote_cluster_as_local_endpoints_stop(web: Path) -> None:
    apply_policy(
        web,
        """
localityFailover: {spillOverThreshold: 70}
retries: {attempts: 3, retryOn: "connect-failure,5xx"}
outlierDetection: {consecutive5xxErrors: 1, interval: 500ms, baseEjectionTime: 4s,
                   maxEjectionPercent: 100}
""",
    )
    all_up = curl(web, 60)
    assert share(all_up, WEST) == 0, pods(all_up)  # a healthy local tier keeps everything
    shares = []
    stopped = []
    try:
        for pod in ("web-1", "web-2", "web-3"):
            record = lifecycle.load(web).process(f"east-{pod}")
            assert record is not None
            stopped.append(record)
            lifecycle.stop_process(web, record.name)  # the workload dies; its sidecar stays
            answers = curl(web, 120)
            assert Counter(a.status for a in answers) == {200: 120}, answers
            shares.append(share(answers, WEST))
    finally:
        for record in stopped:
            lifecycle.start_process(web, record.name, record.netns, list(record.argv))
            control.wait_tcp(web, record.netns, record.name, "127.0.0.1", 8080)
    print(f"spill to west with 1, 2, 3 of 3 local endpoints stopped: {shares}")
    # Local tier 2/3, 1/3, 0 healthy: 4.8 %, 52 %, 100 % spill (threshold 70 %).
    assert shares[0] < 0.2
    assert 0.3 <= shares[1] <= 0.75
    assert shares[2] == 1.0
    wait_all_returned(web, 8.0)  # the ejections end: traffic comes back to the local tier
    back = curl(web, 60)
    assert Counter(a.status for a in back) == {200: 60}
    assert share(back, WEST) <= 0.1, pods(back)


def test_a_cluster_its_gateway_cannot_reach_is_avoided_without_outlier_detection(
    web: Path,
) -> None:
    apply_policy(
        web,
        """
clusterWeights: [{cluster: local, weight: 50}, {cluster: west, weight: 50}]
retries: {attempts: 2, retryOn: "connect-failure"}
""",
    )
    assert share(curl(web, 40), WEST) > 0  # west serves its share while its gateway is up
    gateway = lifecycle.load(web).process("west-gateway")
    assert gateway is not None
    lifecycle.stop_process(web, gateway.name)
    try:
        answers = curl(web, 40)
        # The first call that picks west is refused by the east egress ("peer unreachable",
        # retried in east); from then on the client's sidecar keeps every call off west.
        assert Counter(a.status for a in answers) == {200: 40}, answers
        assert share(answers, WEST) == 0, pods(answers)
        assert client_unreachable(web) == ["west"]
    finally:
        lifecycle.start_process(web, gateway.name, gateway.netns, list(gateway.argv))
    started = time.monotonic()
    while client_unreachable(web) or share(curl(web, 10), WEST) == 0:  # verdict over, tunnel up
        assert time.monotonic() - started < 30, "west never came back"
    back = curl(web, 40)
    assert Counter(a.status for a in back) == {200: 40}, back
    assert share(back, WEST) > 0, pods(back)


def client_unreachable(rig: Path) -> list[str]:
    status = bringup.sidecar_config(rig, "east", "client")["status"]
    assert isinstance(status, dict)
    down: list[str] = status["peers_unreachable"]
    return down
