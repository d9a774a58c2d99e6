"""The dashboards cannot drift from the code: after cross-cluster traffic on the rig, every
metric a dashboard query reads is exposed by the rig's processes (sidecars of both ends, both
gateways, both agents, every controller replica), and the request metrics carry the route and
workload labels the services dashboard groups by."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clusters.rig import control, lifecycle, topology
from mesh.model import ServicePort
from tests.deploy.promql import exposed
from tests.deploy.test_dashboards import dashboard_metrics
from tests.e2e import policy_rig
from tests.e2e.conftest import rig_command
from tests.helpers import until_sync

pytestmark = pytest.mark.rig

SERVICE = "dash"
FQDN = f"{SERVICE}.demo.svc.clusterset.local"
PORT = 8080
URL = f"http://{FQDN}:{PORT}/"
CALLS = 10  # per route
# Every call leaves east (the gateways and the tunnel see it); `tagged` is a named route.
POLICY = """
clusterWeights:
  - {cluster: west, weight: 100}
routes:
  - name: tagged
    match: [{headers: {x-dash: {exact: "1"}}}]
"""
# Families that count events this traffic does not cause (a NACK, an AuthorizationPolicy
# refusal): their processes must declare them, not have a sample.
EVENTS = {"fedgate_config_nacks_total", "fedgate_authz_denied_total"}


def _get(netns: str, url: str) -> str:
    res = subprocess.run(
        ["ip", "netns", "exec", netns, "curl", "-sS", "--noproxy", "*", "--max-time", "5", url],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert res.returncode == 0, f"{url} in {netns}: {res.stderr}"
    return res.stdout


def _scrapes(rig: Path) -> dict[str, str]:
    """Process -> its /metrics text, for each process kind of the rig."""
    state = lifecycle.load(rig)
    out: dict[str, str] = {}
    for c in state.clusters:
        for name, port in (
            ("gateway", topology.GATEWAY_ADMIN_PORT),
            ("agent", topology.AGENT_ADMIN_PORT),
        ):
            out[f"{c.name}-{name}"] = _get(c.netns, f"http://127.0.0.1:{port}/metrics")
    for cluster, pod in (("east", "client"), ("west", "dash-1")):
        netns = policy_rig.pod_netns(rig, cluster, pod)
        url = f"http://127.0.0.1:{topology.SIDECAR_ADMIN_PORT}/metrics"
        out[f"{cluster}/{pod}"] = _get(netns, url)
    layout = control.layout(state.prefix, 1, 2)
    for replica in layout.controllers:
        out[replica.process] = _get(layout.netns, f"http://{replica.admin}/metrics")
    return out


@pytest.fixture(scope="module")
def dash(rig: Path) -> Iterator[Path]:
    fedgate = rig_command().fedgate

    def workload(cluster: str, pod: str) -> list[str]:
        return [*fedgate, "echo", "--cluster", cluster, "--pod", pod, "--port", str(PORT)]

    pods = (("west", "dash-1", "v1"),)
    policy_rig.start_workload(rig, SERVICE, pods, workload, [ServicePort("http", PORT, "HTTP")])
    policy_rig.apply_policy(rig, SERVICE, POLICY)
    yield rig
    policy_rig.remove_policy(rig, SERVICE)


def _traffic(rig: Path) -> None:
    one = "curl -s --noproxy '*' --max-time 10 -o /dev/null -w '%{http_code}\\n'"
    loop = f"for i in $(seq {CALLS}); do {one}"
    script = f"{loop} {URL}; done; {loop} -H 'x-dash: 1' {URL}; done"
    out = policy_rig.run_in_pod(rig, "east", "client", ["sh", "-c", script], timeout=60)
    assert out.split() == ["200"] * (2 * CALLS), out


def _route_samples(text: str) -> dict[tuple[str, str, str, str], float]:
    """(reporter, route, source_workload, destination_workload) -> requests to dash.demo."""
    out: dict[tuple[str, str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "fedgate_requests_total" and s.labels["destination_service"] == FQDN:
                lb = s.labels
                workloads = (lb["source_workload"], lb["destination_workload"])
                key = (lb["reporter"], lb["route"], *workloads)
                out[key] = out.get(key, 0.0) + s.value
    return out


def test_every_dashboard_metric_is_scraped_after_traffic(dash: Path) -> None:
    _traffic(dash)
    wanted = dashboard_metrics()
    # Gateways record a stream when it ends, the controllers' push statistics need ACKs: poll
    # the scrapes until every name shows (or fail naming the missing ones).

    def missing() -> dict[str, set[str]]:
        sampled: set[str] = set()
        declared: set[str] = set()
        for text in _scrapes(dash).values():
            s, d = exposed(text)
            sampled |= s
            declared |= d
        return {
            name: boards
            for name, boards in wanted.items()
            if name not in (declared if name in EVENTS else sampled)
        }

    got = until_sync(missing, 30.0, check=lambda m: not m, what="dashboard metrics", interval=0.5)
    assert got == {}


def test_request_metrics_carry_route_and_workloads(dash: Path) -> None:
    _traffic(dash)
    source = _route_samples(_scrapes(dash)["east/client"])
    assert source[("source", "default", "client", "dash")] >= CALLS
    assert source[("source", "tagged", "client", "dash")] >= CALLS
    # The destination does not match routes; it names the caller by its verified identity.
    served = _route_samples(_scrapes(dash)["west/dash-1"])
    assert served[("destination", "", "client", "dash")] >= 2 * CALLS
