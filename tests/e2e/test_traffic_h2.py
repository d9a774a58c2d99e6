"""Traffic policy over HTTP/2 and gRPC on the rig, with real clients: a grpcio client
(`tests/e2e/grpc_client.py`) and `curl --http2-prior-knowledge`, run in the east client pod.

Service `rpc.demo` has a gRPC port (9090, declared GRPC) and an HTTP/2 port (8082, declared
HTTP2), both served by the rig's gRPC echo workload (`clusters.rig.grpc_echo --h2-port`) in
four pods: east rpc-1, rpc-2 (version v1), rpc-3 (v2), west rpc-w1 (v1). Policies are committed
to the GitOps repository; echo's fail ratio is set at run time inside its pod.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clusters.rig import bringup, lifecycle
from mesh.model import ServicePort
from tests.e2e import policy_rig
from tests.e2e.policy_rig import SUBSETS, run_in_pod, start_workload

pytestmark = pytest.mark.rig

HOST = "rpc.demo.svc.clusterset.local"
GRPC_PORT = 9090
H2_PORT = 8082
PODS = (("east", "rpc-1", "v1"), ("east", "rpc-2", "v1"), ("east", "rpc-3", "v2"))
REMOTE = ("west", "rpc-w1", "v1")
CLIENT = Path(__file__).with_name("grpc_client.py")
STATUS_KEY = f"{HOST}:{GRPC_PORT}"


@dataclass(frozen=True)
class Call:
    outcome: str  # the answering pod, or the gRPC status code's name
    detail: str
    seconds: float


def _run(rig: Path, cluster: str, pod: str, argv: list[str], timeout: float) -> str:
    return run_in_pod(rig, cluster, pod, argv, timeout)


def grpc_calls(
    rig: Path, n: int, delay_ms: int = 0, parallel: bool = False, header: str = ""
) -> list[Call]:
    """`n` gRPC calls from east/client on one channel, in turn or all at once."""
    argv = [sys.executable, str(CLIENT), "call", f"{HOST}:{GRPC_PORT}", str(n)]
    argv += ["--delay-ms", str(delay_ms)] + (["--parallel"] if parallel else [])
    argv += ["--header", header] if header else []
    out = json.loads(_run(rig, "east", "client", argv, timeout=30 + n * 0.1))
    calls = [Call(str(o), str(d), float(s)) for o, d, s in out]
    assert len(calls) == n
    return calls


def echo_control(rig: Path, pod: str, fail_ratio: float | None = None) -> dict[str, float]:
    argv = [sys.executable, str(CLIENT), "control", f"127.0.0.1:{GRPC_PORT}"]
    argv += ["--fail-ratio", str(fail_ratio)] if fail_ratio is not None else []
    data: dict[str, float] = json.loads(_run(rig, "east", pod, argv, timeout=15))
    return data


def curl_h2(rig: Path, n: int) -> list[tuple[int, str, str]]:
    """`n` HTTP/2 requests from one curl, (status, pod, HTTP version) each. One connection per
    request: Debian 12's curl 7.88 breaks when it reuses a prior-knowledge connection
    (curl#10634); many streams on one app connection are the gRPC tests' (one channel)."""
    fmt = "%{http_code} %header{x-fedgate-pod} %{http_version}\\n"
    url = f"http://{HOST}:{H2_PORT}/?i=[1-{n}]"
    argv = ["curl", "-s", "--http2-prior-knowledge", "--noproxy", "*", "--max-time", "30"]
    argv += ["--parallel", "--parallel-immediate", "--parallel-max", str(min(n, 300))]
    argv += ["-w", fmt, *(["-o", "/dev/null"] * n), url]
    out = _run(rig, "east", "client", argv, timeout=40)
    rows = []
    for line in out.splitlines():
        code, pod, version = [*line.split(" "), "", ""][:3]
        rows.append((int(code), pod, version))
    assert len(rows) == n, out
    return rows


def client_status(rig: Path) -> dict[str, object]:
    status = bringup.sidecar_config(rig, "east", "client")["status"]
    assert isinstance(status, dict)
    return status


def apply_policy(rig: Path, spec: str) -> None:
    policy_rig.apply_policy(rig, "rpc", spec)


@pytest.fixture(scope="module")
def rpc(rig: Path) -> Iterator[Path]:
    def workload(cluster: str, pod: str) -> list[str]:
        argv = [sys.executable, "-m", "clusters.rig.grpc_echo", "--cluster", cluster]
        return [*argv, "--pod", pod, "--port", str(GRPC_PORT), "--h2-port", str(H2_PORT)]

    ports = [ServicePort("grpc", GRPC_PORT, "GRPC"), ServicePort("h2", H2_PORT, "HTTP2")]
    start_workload(rig, "rpc", (*PODS, REMOTE), workload, ports)
    yield rig
    policy_rig.remove_policy(rig, "rpc")


def outcomes(calls: list[Call]) -> Counter[str]:
    return Counter(c.outcome for c in calls)


def test_grpc_calls_are_weighted_across_clusters(rpc: Path) -> None:
    apply_policy(rpc, "clusterWeights: [{cluster: local, weight: 60}, {cluster: west, weight: 40}]")
    # The sidecar is the session rig's: earlier modules' HTTP/2 traffic (e.g. the GOAWAY test)
    # opened connections of their own, so count only this test's.
    before = client_status(rpc)["h2"]
    assert isinstance(before, dict)
    calls = grpc_calls(rpc, 200)
    seen = outcomes(calls)
    assert sum(seen[p] for _, p, _ in (*PODS, REMOTE)) == 200, seen  # no failed call
    share = seen["rpc-w1"] / 200
    print(f"west share over 200 gRPC calls on one channel: {share:.3f}")
    # Binomial s.d. of a 40 % share over 200 calls: 3.5 points; +-12 points is 3.4 s.d.
    assert 0.28 <= share <= 0.52, seen
    h2 = client_status(rpc)["h2"]
    assert isinstance(h2, dict)
    opened = h2["connections_opened"] - before["connections_opened"]
    assert opened <= 8  # pooled: about one per endpoint, not one per call


def test_canary_subset_at_ten_percent_over_http2(rpc: Path) -> None:
    apply_policy(
        rpc,
        SUBSETS
        + """
clusterWeights: [{cluster: local, weight: 100}]
subsetWeights: [{subset: v1, weight: 90}, {subset: v2, weight: 10}]
""",
    )
    rows = curl_h2(rpc, 300)
    assert {(code, version) for code, _, version in rows} == {(200, "2")}
    seen = Counter(pod for _, pod, _ in rows)
    assert set(seen) <= {"rpc-1", "rpc-2", "rpc-3"}, seen
    print(f"canary v2 share over 300 HTTP/2 requests: {seen['rpc-3'] / 300:.3f}")
    # Binomial s.d. of the v2 share over 300: 1.7 points; +-5.5 points is 3.2 s.d.
    assert 0.045 <= seen["rpc-3"] / 300 <= 0.155, seen


def test_retries_hide_an_endpoint_that_fails_half_its_calls(rpc: Path) -> None:
    apply_policy(
        rpc,
        """
clusterWeights: [{cluster: local, weight: 100}]
retries: {attempts: 3, retryOn: "unavailable"}
""",
    )
    echo_control(rpc, "rpc-1", 0.5)
    try:
        calls = grpc_calls(rpc, 150)
        failed = echo_control(rpc, "rpc-1")["failed"]
    finally:
        echo_control(rpc, "rpc-1", 0.0)
    assert outcomes(calls).keys() <= {"rpc-1", "rpc-2", "rpc-3"}, outcomes(calls)
    assert failed >= 10  # rpc-1 did fail (UNAVAILABLE); retries hid every failure


def test_per_try_and_overall_timeouts_fire_at_their_values(rpc: Path) -> None:
    apply_policy(
        rpc,
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
    [per_try] = grpc_calls(rpc, 1, delay_ms=2000)
    assert per_try.outcome == "DEADLINE_EXCEEDED", per_try
    assert per_try.detail.startswith("upstream timeout: response not done within per-try")
    # Three tries of 200 ms plus backoff (at most 25 + 75 ms) and the client's own overhead.
    assert 0.6 <= per_try.seconds < 1.0, per_try
    [overall] = grpc_calls(rpc, 1, delay_ms=2000, header="x-case=overall")
    assert overall.outcome == "DEADLINE_EXCEEDED", overall
    assert overall.detail.startswith("upstream timeout"), overall
    assert 0.3 <= overall.seconds < 0.5, overall


def test_http2_max_requests_refuses_calls_beyond_the_limit(rpc: Path) -> None:
    apply_policy(
        rpc,
        """
clusterWeights: [{cluster: local, weight: 100}]
connectionPool: {http: {http2MaxRequests: 2}}
""",
    )
    calls = grpc_calls(rpc, 12, delay_ms=600, parallel=True)
    seen = outcomes(calls)
    refused = [c for c in calls if c.outcome == "UNAVAILABLE"]
    # Two calls in flight; the rest refused at once (a late call may find a slot freed).
    assert 2 <= 12 - len(refused) <= 4, seen
    assert all(c.detail.startswith("max requests: ") for c in refused), refused
    assert all(c.seconds < 0.5 for c in refused), refused


def test_an_endpoint_answering_unavailable_is_ejected_and_returns(rpc: Path) -> None:
    apply_policy(
        rpc,
        """
clusterWeights: [{cluster: local, weight: 100}]
outlierDetection: {consecutive5xxErrors: 3, interval: 500ms, baseEjectionTime: 3s,
                   maxEjectionPercent: 100}
retries: {attempts: 0}  # every failure shows (Istio retries by default)
""",
    )
    rpc2 = lifecycle.load(rpc).pod("east", "rpc-2")
    assert rpc2 is not None
    echo_control(rpc, "rpc-2", 1.0)
    try:
        calls = grpc_calls(rpc, 60)
        services = client_status(rpc)["http"]["services"]  # type: ignore[index]
        ejected = services[STATUS_KEY]["ejected"]
    finally:
        echo_control(rpc, "rpc-2", 0.0)
    assert outcomes(calls)["UNAVAILABLE"] == 3  # exactly the three that ejected it
    assert ejected == [rpc2.ip]
    deadline = time.monotonic() + 6  # base ejection time, then the next interval tick
    while client_status(rpc)["http"]["services"][STATUS_KEY]["ejected"]:  # type: ignore[index]
        assert time.monotonic() < deadline, "rpc-2 never returned"
        time.sleep(0.1)
    back = grpc_calls(rpc, 60)
    assert outcomes(back).keys() <= {"rpc-1", "rpc-2", "rpc-3"}, outcomes(back)
    assert outcomes(back)["rpc-2"] >= 5


def test_fault_abort_and_delay_at_their_percentages(rpc: Path) -> None:
    apply_policy(
        rpc,
        """
clusterWeights: [{cluster: local, weight: 100}]
fault:
  delay: {percentage: {value: 20}, fixedDelay: 100ms}
  abort: {percentage: {value: 25}, httpStatus: 503}
""",
    )
    calls = grpc_calls(rpc, 200)
    aborted = [c for c in calls if c.outcome == "UNAVAILABLE"]
    # 25 % of 200 = 50, s.d. 6.1; 20 % delayed = 40, s.d. 5.7; bounds are ~3.5 s.d.
    assert 29 <= len(aborted) <= 71
    assert all(c.detail.startswith("fault abort: ") for c in aborted)
    assert 20 <= sum(c.seconds >= 0.1 for c in calls) <= 60
    assert outcomes(calls).keys() <= {"rpc-1", "rpc-2", "rpc-3", "UNAVAILABLE"}


def test_mirrored_grpc_calls_arrive_at_the_mirror(rpc: Path) -> None:
    before = echo_control(rpc, "rpc-3")["calls"]
    apply_policy(
        rpc,
        SUBSETS
        + """
clusterWeights: [{cluster: local, weight: 100}]
subsetWeights: [{subset: v1, weight: 100}]
mirror: {subset: v2}
mirrorPercentage: {value: 50}
""",
    )
    calls = grpc_calls(rpc, 100)
    assert outcomes(calls).keys() <= {"rpc-1", "rpc-2"}  # answers only from the primary
    # rpc-3 (v2) gets no primary call: every call it sees is a mirror.
    deadline = time.monotonic() + 5
    while True:
        mirrored = echo_control(rpc, "rpc-3")["calls"] - before
        if mirrored >= 30 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert 30 <= mirrored <= 70  # 50 % of 100 (s.d. 5)
