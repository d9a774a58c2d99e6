"""AuthorizationPolicy on the rig, committed through the GitOps repository as an operator would,
enforced by the destination sidecars (HTTP per request, gRPC per call, TCP per stream).

Every test removes its policy again and waits until the east client is served once more, so
the modules after it see an open service.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusters.rig import bringup, config_repo, control, lifecycle, topology
from clusters.rig.cmd import CommandError
from mesh.model import ServicePort
from tests.e2e.conftest import revive_agents
from tests.e2e.policy_rig import pod_netns, run_in_pod, start_workload
from tests.helpers import until_sync

pytestmark = pytest.mark.rig

ECHO = "http://echo.demo.svc.clusterset.local:8080"
EAST_CLIENT = "spiffe://east.fedgate.local/ns/demo/sa/client"
WEST_CLIENT = "spiffe://west.fedgate.local/ns/demo/sa/client"
RPC_HOST = "authz-rpc.demo.svc.clusterset.local"
RPC_PORT = 9091
REDIS_HOST = "authz-redis.demo.svc.clusterset.local"
REDIS_PORTS = (6391, 6392)
GRPC_CLIENT = Path(__file__).with_name("grpc_client.py")
WITHIN = 30.0  # generous bound for a config change to reach every sidecar


def authz_doc(name: str, host: str, action: str, rules: str) -> str:
    return (
        "apiVersion: fedgate.io/v1alpha1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: demo}}\n"
        f"spec:\n  host: {host}\n  action: {action}\n  rules:\n"
        + "".join(f"    {line}\n" for line in rules.strip("\n").splitlines())
    )


def commit(rig: Path, name: str, doc: str | None) -> float:
    """Commit (or with None remove) `authz/<name>.yaml` and notify the leader, as a git
    server's push webhook does (`POST /sync`); when the commit was made. The commit is made
    whatever happens to the notification: a test's cleanup must not depend on it."""
    leader = run_fedgate(rig, "status", "--json")
    config_repo.commit(config_repo.repo_dir(rig), {f"authz/{name}.yaml": doc}, f"authz {name}")
    made = time.monotonic()
    assert leader.returncode == 0, leader
    admin = json.loads(leader.stdout)["leader"]["admin"]
    netns = topology.control(lifecycle.load(rig).prefix).netns
    hook = ["ip", "netns", "exec", netns, "curl", "-sS", "--noproxy", "*", "--max-time", "30"]
    res = subprocess.run(
        [*hook, "-X", "POST", f"http://{admin}/sync"],
        capture_output=True,
        text=True,
        timeout=40,
        check=False,
    )
    # "up-to-date": the sync's own poll applied the commit first.
    assert json.loads(res.stdout)["result"] in ("applied", "up-to-date"), res
    return made


def run_fedgate(rig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "fedgate", *args, "--rig-dir", str(rig)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def fedgate(rig: Path, *args: str) -> tuple[int, str]:
    res = run_fedgate(rig, *args)
    return res.returncode, res.stdout + res.stderr


def in_control(rig: Path, *args: str) -> tuple[int, str]:
    """`fedgate <args> --etcd <the rig's etcd>` in the rig's control namespace."""
    plan = control.load(rig, lifecycle.load(rig).prefix)
    argv = [sys.executable, "-m", "fedgate", *args, "--etcd", plan.etcd_arg]
    res = subprocess.run(
        ["ip", "netns", "exec", plan.netns, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return res.returncode, res.stdout + res.stderr


def curl(rig: Path, cluster: str, url: str) -> tuple[int, str]:
    """(status, x-fedgate-reason) of one request from `<cluster>/client`."""
    fmt = "%{http_code} %header{x-fedgate-reason}"
    argv = ["curl", "-s", "-o", "/dev/null", "--noproxy", "*", "--max-time", "10", "-w", fmt, url]
    out = run_in_pod(rig, cluster, "client", argv, timeout=15)
    code, _, reason = out.partition(" ")
    return int(code), reason.strip()


def until_status(rig: Path, cluster: str, url: str, status: int) -> tuple[float, str]:
    """Poll until a request from `<cluster>/client` gets `status`; (when, reason)."""
    deadline = time.monotonic() + WITHIN
    while True:
        code, reason = curl(rig, cluster, url)
        if code == status:
            return time.monotonic(), reason
        assert time.monotonic() < deadline, f"{url} still answers {code} {reason!r}"


def until_everywhere(rig: Path, policy: str, pods: list[tuple[str, str]]) -> None:
    """Until every pod's sidecar in `pods` runs AuthorizationPolicy `policy`: a status seen
    from one endpoint says nothing of the service's others (each gets its push apart)."""

    def running(cluster: str, pod: str) -> bool:
        snap = bringup.sidecar_config(rig, cluster, pod).get("snapshot")
        policies = snap.get("authorization", []) if isinstance(snap, dict) else []
        return policy in {a.get("name") for a in policies}

    until_sync(
        lambda: all(running(c, p) for c, p in pods),
        WITHIN,
        what=f"{policy} in every sidecar of {pods}",
        ignoring=(CommandError, ValueError),
    )


def denied_metric(rig: Path, cluster: str, pod: str, service: str, reason: str) -> float:
    """`fedgate_authz_denied_total` of one pod's sidecar for `service` and `reason`."""
    url = f"http://127.0.0.1:{topology.SIDECAR_ADMIN_PORT}/metrics"
    argv = ["curl", "-sS", "--noproxy", "*", "--max-time", "5", url]
    want = f'fedgate_authz_denied_total{{reason="{reason}",service="{service}"}} '
    for line in run_in_pod(rig, cluster, pod, argv, timeout=10).splitlines():
        if line.startswith(want):
            return float(line[len(want) :])
    return 0.0


def log_lines(rig: Path, process: str, event: str) -> list[dict[str, object]]:
    """The JSON log records of `event` (gRPC's C core still writes lines of its own: issue
    14 routes them through structlog; until then they are skipped here)."""
    lines = lifecycle.log_path(rig, process).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    return [r for r in records if r.get("event") == event]


@pytest.fixture
def echo(rig: Path) -> Iterator[Path]:
    revive_agents(rig)
    return rig


def test_allow_only_west_client_refuses_east_within_a_second(echo: Path) -> None:
    rules = f'- from:\n    - source: {{principals: ["{WEST_CLIENT}"]}}'
    committed = commit(echo, "west-only", authz_doc("west-only", ECHO[7:-5], "ALLOW", rules))
    try:
        refused_at, reason = until_status(echo, "east", ECHO + "/", 403)
        took = refused_at - committed
        print(f"east/client refused {took:.2f} s after the commit")
        assert reason == "no ALLOW policy matched"
        until_everywhere(echo, "west-only", [("east", "echo-1"), ("west", "echo-1")])
        # Steady state: every east call refused, every west call served (both clusters' pods).
        east = [curl(echo, "east", ECHO + f"/?i={i}") for i in range(10)]
        west = [curl(echo, "west", ECHO + f"/?i={i}") for i in range(10)]
        assert east == [(403, "no ALLOW policy matched")] * 10
        assert [code for code, _ in west] == [200] * 10
        # The destination sidecars count and log each refusal with its reason.
        fqdn = "echo.demo.svc.clusterset.local"
        refusals = sum(
            denied_metric(echo, c, "echo-1", fqdn, "no ALLOW policy matched")
            for c in ("east", "west")
        )
        assert refusals >= 11

        def denied_lines() -> list[dict[str, object]]:
            return [
                line
                for c in ("east", "west")
                for line in log_lines(echo, f"{c}-echo-1-sidecar", "inbound request denied")
            ]

        lines = until_sync(
            denied_lines, WITHIN, check=lambda got: len(got) >= 11, what="the refusals' lines"
        )
        assert {(r["reason"], r["status"], r["caller"]) for r in lines} == {
            ("no ALLOW policy matched", 403, EAST_CLIENT)
        }
        assert took < 1.0, f"refusal took {took:.2f} s"
        # The operator's view: the decision and the policy, as `istioctl x authz check` gives.
        denied = fedgate(echo, "authz", "check", EAST_CLIENT, "echo.demo", "--path", "/x")
        allowed = fedgate(echo, "authz", "check", WEST_CLIENT, "echo.demo")
        assert denied[0] == 1, denied
        assert "decision  DENY: no ALLOW policy matched" in denied[1]
        assert "policies  demo/west-only (ALLOW)" in denied[1]
        assert allowed[0] == 0, allowed
        assert "allowed by authorization policy demo/west-only" in allowed[1]
        status = fedgate(echo, "status")
        assert "AuthorizationPolicy: demo/west-only (ALLOW)" in status[1], status
    finally:
        commit(echo, "west-only", None)
        until_status(echo, "east", ECHO + "/", 200)


def test_deny_on_one_path_serves_the_others(echo: Path) -> None:
    rules = (
        f'- from:\n    - source: {{principals: ["{EAST_CLIENT}"]}}\n'
        '  to:\n    - operation: {paths: ["/private/*"], methods: ["GET"]}'
    )
    commit(echo, "no-private", authz_doc("no-private", ECHO[7:-5], "DENY", rules))
    try:
        _, reason = until_status(echo, "east", ECHO + "/private/x", 403)
        assert reason == "denied by authorization policy demo/no-private"
        until_everywhere(echo, "no-private", [("east", "echo-1"), ("west", "echo-1")])
        # Path normalisation: a dot segment or a doubled slash does not walk around the DENY.
        assert curl(echo, "east", ECHO + "/public/%2E%2E/private/x")[0] == 403
        assert curl(echo, "east", ECHO + "//private/x")[0] == 403
        assert [curl(echo, "east", ECHO + f"/public/{i}")[0] for i in range(5)] == [200] * 5
        assert curl(echo, "west", ECHO + "/private/x")[0] == 200  # only east is denied
    finally:
        commit(echo, "no-private", None)
        until_status(echo, "east", ECHO + "/private/x", 200)


@pytest.fixture(scope="module")
def rpc(rig: Path) -> Path:
    def workload(cluster: str, pod: str) -> list[str]:
        argv = [sys.executable, "-m", "clusters.rig.grpc_echo", "--cluster", cluster]
        return [*argv, "--pod", pod, "--port", str(RPC_PORT)]

    ports = [ServicePort("grpc", RPC_PORT, "GRPC")]
    start_workload(rig, "authz-rpc", [("west", "authz-rpc-1", "v1")], workload, ports)
    return rig


def grpc_outcomes(rig: Path, n: int) -> list[tuple[str, str]]:
    argv = [sys.executable, str(GRPC_CLIENT), "call", f"{RPC_HOST}:{RPC_PORT}", str(n)]
    out = json.loads(run_in_pod(rig, "east", "client", argv, timeout=60))
    return [(str(o), str(d)) for o, d, _ in out]


def test_a_grpc_method_is_refused_with_permission_denied(rpc: Path) -> None:
    assert {o for o, _ in grpc_outcomes(rpc, 3)} == {"authz-rpc-1"}
    rules = (
        f'- from:\n    - source: {{principals: ["{EAST_CLIENT}"]}}\n'
        '  to:\n    - operation: {paths: ["/fedgate.rig.echo.Echo/Call"]}'
    )
    commit(rpc, "no-call", authz_doc("no-call", RPC_HOST, "DENY", rules))
    try:
        deadline = time.monotonic() + WITHIN
        while (got := grpc_outcomes(rpc, 1)[0])[0] != "PERMISSION_DENIED":
            assert time.monotonic() < deadline, got
        calls = grpc_outcomes(rpc, 5)
        assert [o for o, _ in calls] == ["PERMISSION_DENIED"] * 5
        assert "denied by authorization policy demo/no-call" in calls[0][1]
    finally:
        commit(rpc, "no-call", None)
        deadline = time.monotonic() + WITHIN
        while grpc_outcomes(rpc, 1)[0][0] != "authz-rpc-1":
            assert time.monotonic() < deadline


@pytest.fixture(scope="module")
def redis(rig: Path) -> Path:
    def workload(cluster: str, pod: str) -> list[str]:
        servers = " & ".join(
            f"redis-server --port {p} --save '' --appendonly no" for p in REDIS_PORTS
        )
        return ["sh", "-c", f"{servers} & wait"]

    ports = [ServicePort(f"redis-{p}", p) for p in REDIS_PORTS]
    start_workload(rig, "authz-redis", [("west", "authz-redis-1", "v1")], workload, ports)
    return rig


def redis_ping(rig: Path, port: int) -> str:
    argv = ["redis-cli", "-h", REDIS_HOST, "-p", str(port), "PING"]
    res = subprocess.run(
        ["ip", "netns", "exec", pod_netns(rig, "east", "client"), *argv],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    return (res.stdout + res.stderr).strip()


HOLDER = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"PING\\r\\n"); print(s.recv(64).decode().strip(), flush=True)
sys.stdin.readline()
try:
    s.sendall(b"PING\\r\\n"); got = s.recv(64)
    print(got.decode().strip() or "closed", flush=True)
except OSError as e:
    print(f"closed: {e}", flush=True)
"""


def test_a_tcp_port_is_refused_and_an_open_stream_cut_off(redis: Path) -> None:
    assert [redis_ping(redis, p) for p in REDIS_PORTS] == ["PONG", "PONG"]
    netns = pod_netns(redis, "east", "client")
    argv = ["ip", "netns", "exec", netns, sys.executable, "-c", HOLDER, REDIS_HOST]
    try:
        with subprocess.Popen(
            [*argv, str(REDIS_PORTS[0])], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        ) as holder:
            try:
                assert holder.stdout is not None
                assert holder.stdin is not None
                assert holder.stdout.readline().strip() == "+PONG"  # open before the commit
                rules = (
                    f'- from:\n    - source: {{principals: ["{EAST_CLIENT}"]}}\n'
                    f"  to:\n    - operation: {{ports: [{REDIS_PORTS[0]}]}}"
                )
                commit(redis, "no-redis", authz_doc("no-redis", REDIS_HOST, "DENY", rules))
                deadline = time.monotonic() + WITHIN
                while redis_ping(redis, REDIS_PORTS[0]) == "PONG":
                    assert time.monotonic() < deadline, "the denied port still answers"
                assert redis_ping(redis, REDIS_PORTS[1]) == "PONG"  # refused per port

                # The source sidecar logs why its stream was refused (its log goes through a
                # pipe, fedgate.native_logs: poll for the line). The first non-PONG may have
                # been a stream the destination admitted just before its config changed and
                # then cut (`enforce`), which is logged as a close, not a refusal: each poll
                # opens a new connection, which the destination refuses by its header.
                def refusals() -> list[dict[str, object]]:
                    redis_ping(redis, REDIS_PORTS[0])
                    failed = log_lines(redis, "east-client-sidecar", "outbound failed")
                    want = "denied by authorization policy demo/no-redis"
                    return [r for r in failed if want in str(r.get("detail"))]

                until_sync(refusals, WITHIN, what="east/client's sidecar logs the refusal")
                holder.stdin.write("\n")
                holder.stdin.flush()
                assert holder.stdout.readline().startswith("closed")
            finally:
                holder.kill()
    finally:
        commit(redis, "no-redis", None)
        deadline = time.monotonic() + WITHIN
        while redis_ping(redis, REDIS_PORTS[0]) != "PONG":
            assert time.monotonic() < deadline


def test_http_fields_on_a_tcp_port_are_rejected_by_the_sync_and_validate(redis: Path) -> None:
    rules = (
        f'- from:\n    - source: {{principals: ["{EAST_CLIENT}"]}}\n'
        "  to:\n    - operation: {methods: [GET]}"
    )
    doc = authz_doc("redis-get", REDIS_HOST, "ALLOW", rules)
    field = "spec.rules[0].to[0].operation.methods"
    # `fedgate config validate --etcd` (the repository's CI) checks against the live catalog.
    repo = config_repo.repo_dir(redis)
    checkout = repo.parent / "authz-validate"
    subprocess.run(["git", "clone", "-q", str(repo), str(checkout)], check=True, timeout=30)
    (checkout / "authz").mkdir(exist_ok=True)
    (checkout / "authz" / "redis-get.yaml").write_text(doc)
    code, out = in_control(redis, "config", "validate", str(checkout))
    assert code == 1, out
    assert "authz/redis-get.yaml:" in out
    assert f"{field}: methods is an HTTP field" in out
    assert "whose protocol is TCP" in out
    # The controller's sync rejects the same commit whole and keeps the applied config.
    try:
        config_repo.commit(repo, {"authz/redis-get.yaml": doc}, "authz: HTTP fields on redis")
        deadline = time.monotonic() + WITHIN
        while field not in (status := in_control(redis, "config", "status")[1]):
            assert time.monotonic() < deadline, status
        assert "rejected:" in status
        assert redis_ping(redis, REDIS_PORTS[0]) == "PONG"
    finally:
        commit(redis, "redis-get", None)
