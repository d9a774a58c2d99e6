"""Observability end to end on the rig: one cross-cluster request as a trace of its four hops
(exported with OTLP/gRPC to a collector in this process), the access-log lines of those hops
with the same ids, the request counters of both clusters' `/metrics`, and a refusal at each
hop logged with the hop and its reason.

Over the 450-line aim: the hops of one traced request are asserted against one rig, with the same
request ids, so they stay together.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clusters.rig import bringup, config_repo, lifecycle, topology
from mesh import telemetry as tm
from mesh.model import ServicePort
from tests.e2e.conftest import revive_agents, rig_command
from tests.e2e.otlp import CollectedSpan, Collector
from tests.e2e.policy_rig import run_in_pod, start_workload
from tests.helpers import until_sync

pytestmark = pytest.mark.rig

PORT = 9191
FQDN = "obs.demo.svc.clusterset.local"
URL = f"http://{FQDN}:{PORT}"
PROBE = Path(__file__).with_name("probe.py")
POLICY_FILE = "policies/obs.yaml"
WITHIN = 30.0
HOPS = (tm.SOURCE, tm.EGRESS, tm.INGRESS, tm.DESTINATION)
RPC = "obsrpc.demo.svc.clusterset.local"
RPC_GRPC_PORT = 9090
RPC_H2_PORT = 8082
GRPC_CLIENT = Path(__file__).with_name("grpc_client.py")


def _run(netns: str, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _pod_netns(rig: Path, cluster: str, pod: str) -> str:
    record = lifecycle.load(rig).pod(cluster, pod)
    assert record is not None
    return record.netns


@pytest.fixture(scope="module")
def obs(rig: Path, otlp_collector: Collector) -> Path:
    """A service only west serves (so every call from east crosses both gateways)."""
    assert rig_command().otlp_endpoint == otlp_collector.endpoint  # the rig exports to us
    # Other modules of the session kill agents; a pod needs its cluster's CA (the agent).
    revive_agents(rig)
    argv = [*rig_command().fedgate, "echo", "--cluster", "west", "--pod", "obs", "--port"]
    bringup.add_pod(
        rig,
        rig_command(),
        "west",
        "obs",
        "demo",
        "obs",
        [*argv, str(PORT)],
        ("obs.demo", ServicePort("http", PORT, "HTTP")),
    )
    bringup.wait_routes(rig, "obs", "demo", 1)
    until_sync(
        lambda: bringup.endpoints_seen(bringup.sidecar_config(rig, "west", "obs"), "obs", "demo"),
        WITHIN,
        what="west/obs's sidecar learns obs.demo",
    )
    return rig


# --- reading what the rig reports ---------------------------------------------------------------


def _log_lines(rig: Path, **match: str) -> list[dict[str, Any]]:
    """Every JSON log line of every rig process whose fields equal `match`."""
    out = []
    for path in lifecycle.logs_dir(rig).glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{") or not all(v in line for v in match.values()):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if all(event.get(k) == v for k, v in match.items()):
                out.append(event)
    return out


def _requests(netns: str, reporter: str, code: str = "200", fqdn: str = FQDN) -> float:
    """`fedgate_requests_total` for `fqdn` (obs.demo) from the admin `/metrics` served in
    `netns`."""
    port = topology.SIDECAR_ADMIN_PORT
    res = _run(netns, ["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/metrics"])
    assert res.returncode == 0, res.stderr
    total = 0.0
    for family in text_string_to_metric_families(res.stdout):
        for s in family.samples:
            labels = s.labels
            if (
                s.name == "fedgate_requests_total"
                and labels.get("reporter") == reporter
                and labels.get("destination_service") == fqdn
                and labels.get("response_code") == code
            ):
                assert labels["source_cluster"] == "east", labels
                assert labels["destination_cluster"] == "west", labels
                total += s.value
    return total


def _curl(rig: Path, path: str, *headers: str) -> subprocess.CompletedProcess[str]:
    h = [arg for header in headers for arg in ("-H", header)]
    argv = ["curl", "-sS", "--noproxy", "*", "--max-time", "10", *h, f"{URL}{path}"]
    return _run(_pod_netns(rig, "east", "client"), argv)


# --- one request, four hops ---------------------------------------------------------------------


def test_a_cross_cluster_request_is_one_trace_with_its_logs_and_metrics(
    obs: Path, otlp_collector: Collector
) -> None:
    east_client = _pod_netns(obs, "east", "client")
    west_obs = _pod_netns(obs, "west", "obs")
    sent_before = _requests(east_client, "source")
    served_before = _requests(west_obs, "destination")
    # The app's own trace: the sidecar continues it.
    trace_id, app_span = secrets.token_hex(16), secrets.token_hex(8)
    res = _curl(obs, "/hello", f"traceparent: 00-{trace_id}-{app_span}-01")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["cluster"] == "west"

    def complete(spans: list[CollectedSpan]) -> bool:
        return {s.attributes.get(tm.HOP) for s in spans} >= set(HOPS)

    spans = otlp_collector.wait_trace(trace_id, complete)
    assert complete(spans), [(s.name, s.attributes.get(tm.HOP)) for s in spans]
    assert len(spans) == 4, spans
    hop = {str(s.attributes[tm.HOP]): s for s in spans}
    src, egress, ingress, dst = (hop[h] for h in HOPS)
    # Parent order: the app -> source sidecar -> egress -> ingress -> destination sidecar.
    assert src.parent_id == app_span
    assert egress.parent_id == src.span_id
    assert ingress.parent_id == egress.span_id
    assert dst.parent_id == ingress.span_id
    assert (src.service, egress.service, ingress.service, dst.service) == (
        "fedgate-sidecar",
        "fedgate-gateway",
        "fedgate-gateway",
        "fedgate-sidecar",
    )
    for s in spans:
        assert s.attributes[tm.SERVICE] == FQDN, s
        assert s.attributes[tm.SOURCE_CLUSTER] == "east", s
        assert s.attributes[tm.DESTINATION_CLUSTER] == "west", s
        assert not s.error, s
    obs_ip = lifecycle.load(obs).pod("west", "obs")
    assert obs_ip is not None
    assert src.attributes[tm.STATUS] == 200
    assert src.attributes[tm.RETRIES] == 0
    assert src.attributes[tm.METHOD] == "GET"
    assert ingress.attributes[tm.ENDPOINT] == obs_ip.ip  # the endpoint the ingress picked
    assert dst.attributes[tm.STATUS] == 200
    assert dst.attributes[tm.PATH] == "/hello"
    assert str(dst.attributes[tm.PEER]).endswith("/ns/demo/sa/client")  # the real caller

    # One access line per hop with the same trace, each naming its hop and its own span.
    events = {
        tm.SOURCE: "http request",
        tm.EGRESS: "egress call established",
        tm.INGRESS: "ingress call established",
        tm.DESTINATION: "inbound request",
    }

    def lines() -> dict[str, list[dict[str, Any]]]:
        found = {h: _log_lines(obs, trace_id=trace_id, hop=h, event=e) for h, e in events.items()}
        return found if all(found.values()) else {}

    found = until_sync(lines, 10, what="access lines of every hop")
    for h, [line] in found.items():
        assert line["span_id"] == hop[h].span_id, line
    assert found[tm.SOURCE][0]["status"] == 200
    assert found[tm.DESTINATION][0]["status"] == 200

    # Both clusters count it: the caller's sidecar as source, the callee's as destination.
    until_sync(
        lambda: _requests(east_client, "source") > sent_before,
        WITHIN,
        what="east counts the request",
    )
    until_sync(
        lambda: _requests(west_obs, "destination") > served_before,
        WITHIN,
        what="west counts the request",
    )


def test_an_app_without_a_trace_gets_one_started_by_its_sidecar(
    obs: Path, otlp_collector: Collector
) -> None:
    marker = f"/untraced-{secrets.token_hex(4)}"
    res = _curl(obs, marker)
    assert res.returncode == 0, res.stderr

    def served() -> list[CollectedSpan]:
        with_path = [s for s in otlp_collector.spans if s.attributes.get(tm.PATH) == marker]
        return with_path if len(with_path) == 2 else []

    src, dst = sorted(
        until_sync(served, WITHIN, what="both sidecars' spans"), key=lambda s: s.kind != 3
    )
    assert src.attributes[tm.HOP] == tm.SOURCE  # CLIENT kind (3) first
    assert dst.attributes[tm.HOP] == tm.DESTINATION
    assert src.parent_id == ""  # a new trace, rooted at the source sidecar
    assert dst.trace_id == src.trace_id
    # On a pooled connection the destination hangs under the source; on one this request
    # opened, under the gateways' spans, which hang under the source: either way, its root.
    parents = {s.span_id: s.parent_id for s in otlp_collector.trace(src.trace_id)}
    up, seen = dst.parent_id, 0
    while up and up != src.span_id and seen < 4:
        up, seen = parents.get(up, ""), seen + 1
    assert up == src.span_id, (dst, parents)


# --- HTTP/2 and gRPC calls, traced and counted as HTTP/1.1 is ---------------------------------


@pytest.fixture(scope="module")
def obsrpc(obs: Path) -> Path:
    """`obsrpc.demo`: a gRPC port and an HTTP/2 port served only in west (the rig's gRPC echo)."""

    def workload(cluster: str, pod: str) -> list[str]:
        argv = [sys.executable, "-m", "clusters.rig.grpc_echo", "--cluster", cluster, "--pod", pod]
        return [*argv, "--port", str(RPC_GRPC_PORT), "--h2-port", str(RPC_H2_PORT)]

    ports = [ServicePort("grpc", RPC_GRPC_PORT, "GRPC"), ServicePort("h2", RPC_H2_PORT, "HTTP2")]
    start_workload(obs, "obsrpc", (("west", "obsrpc-1", "v1"),), workload, ports)
    return obs


def _source_then_gateways(
    collector: Collector, trace_id: str, app_span: str
) -> dict[str, CollectedSpan]:
    """The source sidecar's span and the two gateways' of one call's trace, in parent order.
    (The destination sidecar traces an HTTP/2 connection, not each stream: its span comes when
    the pooled connection closes.)"""
    hops = (tm.SOURCE, tm.EGRESS, tm.INGRESS)

    def complete(spans: list[CollectedSpan]) -> bool:
        return {s.attributes.get(tm.HOP) for s in spans} >= set(hops)

    spans = collector.wait_trace(trace_id, complete)
    assert complete(spans), [(s.name, s.attributes.get(tm.HOP)) for s in spans]
    hop = {str(s.attributes[tm.HOP]): s for s in spans if s.attributes[tm.HOP] in hops}
    src, egress, ingress = (hop[h] for h in hops)
    assert len([s for s in spans if s.attributes[tm.HOP] == tm.SOURCE]) == 1, spans
    assert src.parent_id == app_span
    assert src.kind == 3  # CLIENT
    assert src.service == "fedgate-sidecar"
    assert egress.parent_id == src.span_id
    assert ingress.parent_id == egress.span_id
    for s in (src, egress, ingress):
        assert s.attributes[tm.SERVICE] == RPC, s
        assert s.attributes[tm.SOURCE_CLUSTER] == "east", s
        assert s.attributes[tm.DESTINATION_CLUSTER] == "west", s
        assert not s.error, s
    assert src.attributes[tm.STATUS] == 200
    assert src.attributes[tm.RETRIES] == 0
    dst = [s for s in spans if s.attributes[tm.HOP] == tm.DESTINATION]
    assert all(d.parent_id in {ingress.span_id, src.span_id} for d in dst), dst
    return hop


def _source_line(rig: Path, trace_id: str, span_id: str) -> dict[str, Any]:
    def line() -> list[dict[str, Any]]:
        return _log_lines(rig, trace_id=trace_id, hop=tm.SOURCE, event="http request")

    [found] = until_sync(line, 10, what="the source sidecar's access line")
    assert isinstance(found, dict)
    assert found["span_id"] == span_id, found
    assert found["status"] == 200
    assert found["dst_cluster"] == "west"
    return found


def test_http2_and_grpc_calls_are_traced_and_counted_by_the_source_sidecar(
    obsrpc: Path, otlp_collector: Collector
) -> None:
    east_client = _pod_netns(obsrpc, "east", "client")
    before = _requests(east_client, "source", fqdn=RPC)

    # HTTP/2 (curl, prior knowledge), in the app's own trace.
    trace_id, app_span = secrets.token_hex(16), secrets.token_hex(8)
    argv = ["curl", "-sS", "--http2-prior-knowledge", "--noproxy", "*", "--max-time", "10"]
    argv += ["-H", f"traceparent: 00-{trace_id}-{app_span}-01", "-o", "/dev/null"]
    argv += ["-w", "%{http_code} %{http_version}", f"http://{RPC}:{RPC_H2_PORT}/h2"]
    res = _run(east_client, argv)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "200 2", res.stdout
    h2 = _source_then_gateways(otlp_collector, trace_id, app_span)
    assert h2[tm.SOURCE].attributes[tm.PROTOCOL] == "http"
    assert h2[tm.SOURCE].attributes[tm.PATH] == "/h2"
    assert _source_line(obsrpc, trace_id, h2[tm.SOURCE].span_id)["protocol"] == "h2"

    # gRPC (grpcio), with the traceparent as call metadata.
    trace_id, app_span = secrets.token_hex(16), secrets.token_hex(8)
    argv = [sys.executable, str(GRPC_CLIENT), "call", f"{RPC}:{RPC_GRPC_PORT}", "1"]
    argv += ["--header", f"traceparent=00-{trace_id}-{app_span}-01"]
    [[pod, detail, _]] = json.loads(run_in_pod(obsrpc, "east", "client", argv, timeout=30))
    assert pod == "obsrpc-1", detail
    grpc_call = _source_then_gateways(otlp_collector, trace_id, app_span)
    src = grpc_call[tm.SOURCE]
    assert src.attributes[tm.PROTOCOL] == "grpc"
    assert src.attributes[tm.PATH] == "/fedgate.rig.echo.Echo/Call"
    assert src.attributes["rpc.grpc.status_code"] == 0
    assert _source_line(obsrpc, trace_id, src.span_id)["grpc"] is True

    # East's sidecar counts both, as source.
    until_sync(
        lambda: _requests(east_client, "source", fqdn=RPC) >= before + 2,
        WITHIN,
        what="east counts both calls",
    )


# --- refusals name their hop and reason ---------------------------------------------------------


def _probe(netns: str, *args: str) -> dict[str, str]:
    res = _run(netns, [sys.executable, str(PROBE), *args], timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def _refusals(rig: Path, hop: str, event: str, **match: str) -> list[dict[str, Any]]:
    return _log_lines(rig, hop=hop, event=event, **match)


def test_bad_identity_is_refused_and_logged_by_the_destination_sidecar_and_gateway(
    obs: Path,
) -> None:
    state = lifecycle.load(obs)
    east, west = topology.cluster(state.prefix, 0), topology.cluster(state.prefix, 1)
    pod = state.pod("west", "obs")
    assert pod is not None
    west_root = str(bringup.ca_dir(obs, "west") / "root.pem")
    east_ca = str(bringup.ca_dir(obs, "east"))
    # Only this test's lines (by pod, by cluster): other tests of the session leave refusals.
    before = len(_refusals(obs, tm.DESTINATION, "inbound refused", pod="obs"))
    # The genuine east root minting a west identity: only the SPIFFE scoping catches it.
    args = ("tls", "wrong-domain", pod.ip, str(topology.SIDECAR_INBOUND_PORT), west_root, east_ca)
    assert _probe(west.netns, *args)["result"] == "refused"
    refused = until_sync(
        lambda: _refusals(obs, tm.DESTINATION, "inbound refused", pod="obs")[before:],
        WITHIN,
        what="the destination sidecar's refusal",
    )
    assert refused[-1]["reason"] == "trust-domain mismatch", refused

    before = len(_refusals(obs, tm.INGRESS, "tunnel handshake refused", cluster="west"))
    tunnel = ("tls", "foreign-root", west.wan_ip, str(topology.TUNNEL_PORT), west_root, east_ca)
    assert _probe(east.netns, *tunnel)["result"] == "refused"
    refused = until_sync(
        lambda: _refusals(obs, tm.INGRESS, "tunnel handshake refused", cluster="west")[before:],
        WITHIN,
        what="the west gateway's refusal",
    )
    assert "certificate" in refused[-1]["reason"], refused


def test_no_endpoint_is_refused_and_logged_by_the_ingress_and_the_egress(obs: Path) -> None:
    # obs.demo has no endpoint in east: a CONNECT from west naming east reaches the east
    # ingress, which refuses; the west egress passes the reason on to the caller.
    state = lifecycle.load(obs)
    west = topology.cluster(state.prefix, 1)
    egress = f"http://{west.egress_address[0]}:{west.egress_address[1]}"
    # Only this call's lines: other tests of the session leave refusals of other services.
    mine = {"service": "obs.demo"}
    before_in = len(_refusals(obs, tm.INGRESS, "ingress call refused", cluster="east", **mine))
    before_out = len(_refusals(obs, tm.EGRESS, "egress call refused", cluster="west", **mine))
    argv = ["curl", "-sS", "--max-time", "10", "-p", "-x", egress]
    argv += ["--proxy-header", "Fedgate-Cluster: east", f"{URL}/"]
    res = _run(west.netns, argv)
    assert res.returncode != 0  # curl: CONNECT tunnel failed, response 503
    assert "503" in res.stderr, res.stderr
    ingress = until_sync(
        lambda: _refusals(obs, tm.INGRESS, "ingress call refused", cluster="east", **mine)[
            before_in:
        ],
        WITHIN,
        what="the east ingress's refusal",
    )
    assert ingress[-1]["reason"] == "fedgate ingress east: no healthy endpoint for obs.demo"
    assert ingress[-1]["status"] == 503
    egress_lines = until_sync(
        lambda: _refusals(obs, tm.EGRESS, "egress call refused", cluster="west", **mine)[
            before_out:
        ],
        WITHIN,
        what="the west egress's refusal",
    )
    assert egress_lines[-1]["reason"] == ingress[-1]["reason"]  # passed on verbatim


def test_pool_full_is_refused_and_logged_by_the_source_sidecar(obs: Path) -> None:
    doc = (
        "apiVersion: fedgate.io/v1alpha1\nkind: TrafficPolicy\n"
        "metadata: {name: obs, namespace: demo}\n"
        f"spec:\n  host: {FQDN}\n"
        "  connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}\n"
    )
    repo = config_repo.repo_dir(obs)
    config_repo.commit(repo, {POLICY_FILE: doc}, "obs: a pool of one")
    try:

        def applied() -> bool:
            snap = bringup.sidecar_config(obs, "east", "client").get("snapshot")
            policies = snap.get("policies", []) if isinstance(snap, dict) else []
            return any(p.get("name") == "obs" and "connectionPool" in p for p in policies)

        until_sync(applied, WITHIN, what="the obs policy reaches east/client")
        mine = {"service": "obs.demo", "pod": "client", "cluster": "east"}
        before = len(_refusals(obs, tm.SOURCE, "http request failed", **mine))
        one = "curl -s --noproxy '*' --max-time 10 -o /dev/null -w '%{http_code}\\n' "
        one += f"{URL}/delay/800"
        script = f"for i in 1 2 3 4 5 6; do {one} & done; wait"
        res = _run(_pod_netns(obs, "east", "client"), ["sh", "-c", script])
        assert res.returncode == 0, res.stderr
        assert "503" in res.stdout.split(), res.stdout
        failed = until_sync(
            lambda: _refusals(obs, tm.SOURCE, "http request failed", **mine)[before:],
            WITHIN,
            what="the source sidecar's refusal",
        )
        assert {line["reason"] for line in failed} == {"pending overflow"}, failed
        assert all(line["status"] == 503 and line["trace_id"] for line in failed), failed
    finally:
        config_repo.commit(repo, {POLICY_FILE: None}, "obs: policy removed")
