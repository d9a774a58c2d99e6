"""The Grafana dashboards and the scrape configuration in deploy/: valid, with the panels the
issue asks for, reading only metrics fedgate defines (the rig test checks they are scraped)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from clusters.inject.spec import INJECTED_LABEL, METRICS_PORT_NAME
from tests.deploy.promql import dashboard_exprs, exposed, extract

DEPLOY = Path(__file__).parents[2] / "deploy"
DASHBOARDS = sorted((DEPLOY / "dashboards").glob("*.json"))
MONITORING = DEPLOY / "monitoring"


def load(name: str) -> dict[str, Any]:
    board = json.loads((DEPLOY / "dashboards" / name).read_text())
    assert isinstance(board, dict)
    return board


def dashboard_metrics() -> dict[str, set[str]]:
    """Metric name -> the dashboards whose queries read it."""
    out: dict[str, set[str]] = {}
    for path in DASHBOARDS:
        for expr in dashboard_exprs(json.loads(path.read_text())):
            for name in extract(expr):
                out.setdefault(name, set()).add(path.name)
    return out


def _titles(board: dict[str, Any]) -> list[str]:
    return [p["title"] for p in board["panels"] if p["type"] != "row"]


def _exprs(board: dict[str, Any], title_part: str) -> list[str]:
    return [
        t["expr"]
        for p in board["panels"]
        if title_part in p["title"] and p["type"] != "row"
        for t in p["targets"]
    ]


# --- the extractor ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('sum by (le, route) (rate(a_bucket{x="y", z=~"$v|b"}[$__rate_interval]))', {"a_bucket"}),
        ("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m])))", {"h_bucket"}),
        ('a_total{code=~"5.."}\n/\nsum without (pod) (b_total) > 0.5', {"a_total", "b_total"}),
        ("bottomk(10, min by (k) (c_seconds) - time())", {"c_seconds"}),
        ("x * on (a) group_left (b) y_info", {"x", "y_info"}),
        ("rate(m[5m] offset 1h) and bool n", {"m", "n"}),
        ("max_over_time(g[1h:5m]) + 1e3", {"g"}),
    ],
)
def test_the_extractor_finds_the_metric_names(expr: str, names: set[str]) -> None:
    assert extract(expr) == names


def test_the_extractor_refuses_name_matchers() -> None:
    with pytest.raises(ValueError, match="__name__"):
        extract('{__name__="x"}')


def test_a_scrape_exposes_sample_names_and_declared_families() -> None:
    text = (
        "# HELP c_total c\n# TYPE c_total counter\n"
        "# HELP h h\n# TYPE h histogram\n"
        'h_bucket{le="+Inf"} 1\nh_sum 0.5\nh_count 1\n'
    )
    sampled, declared = exposed(text)
    assert sampled == {"h_bucket", "h_sum", "h_count"}
    assert {"c_total", "h_bucket", "h_sum", "h_count"} <= declared


# --- the dashboards -----------------------------------------------------------------------------


def test_there_are_the_three_dashboards_with_unique_uids() -> None:
    names = [p.name for p in DASHBOARDS]
    assert names == [
        "fedgate-control-plane.json",
        "fedgate-gateway-links.json",
        "fedgate-services.json",
    ]
    uids = [load(n)["uid"] for n in names]
    assert len(set(uids)) == 3
    for n in names:
        board = load(n)
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{n}: panel ids repeat"
        for p in board["panels"]:
            if p["type"] != "row":
                assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
                assert p["targets"], p["title"]
                assert all(t["expr"] for t in p["targets"]), p["title"]


def test_services_has_rate_errors_and_both_percentiles_by_cluster_and_by_route() -> None:
    board = load("fedgate-services.json")
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert any("source and destination cluster" in r for r in rows)
    assert any("route" in r for r in rows)
    titles = _titles(board)
    for title in ("Request rate", "Error rate", "Latency p50", "Latency p99"):
        assert titles.count(next(t for t in titles if t.startswith(title))) == 2, title
    by_cluster = _exprs(board, "Latency p99")[0]
    assert "histogram_quantile(0.99" in by_cluster
    assert "source_cluster, destination_cluster" in by_cluster
    assert "histogram_quantile(0.5" in _exprs(board, "Latency p50")[1]
    assert "route" in _exprs(board, "Latency p50")[1]
    assert any("source_workload" in e for e in _exprs(board, "by workload"))


def test_gateway_links_has_health_rtt_streams_and_bytes() -> None:
    exprs = " ".join(e for e in dashboard_exprs(load("fedgate-gateway-links.json")))
    for metric in (
        "fedgate_tunnel_peer_healthy",
        "fedgate_tunnel_rtt_seconds",
        "fedgate_tunnel_open_streams",
        "fedgate_request_bytes_total",
    ):
        assert metric in exprs, metric


def test_control_plane_has_versions_push_latency_and_liveness() -> None:
    board = load("fedgate-control-plane.json")
    [table] = [p for p in board["panels"] if p["title"] == "Config version each proxy runs"]
    assert table["type"] == "table"
    assert "fedgate_config_subscriber_version_info" in table["targets"][0]["expr"]
    exprs = " ".join(dashboard_exprs(board))
    assert "fedgate_config_push_latency_seconds_bucket" in exprs
    assert "fedgate_cluster_live" in exprs


def test_every_dashboard_metric_is_a_fedgate_metric() -> None:
    # The rig test (tests/e2e/test_dashboards.py) checks each is scraped after traffic.
    names = dashboard_metrics()
    assert names
    assert all(n.startswith("fedgate_") for n in names), sorted(names)


# --- scraping -----------------------------------------------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_pod_monitors_select_the_fedgate_pods_on_their_admin_port() -> None:
    monitors = {d["metadata"]["name"]: d for d in _docs(MONITORING / "podmonitors.yaml")}
    assert set(monitors) == {"fedgate-control-plane", "fedgate-sidecars"}
    for m in monitors.values():
        assert (m["apiVersion"], m["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
        [endpoint] = m["spec"]["podMetricsEndpoints"]
        assert endpoint["path"] == "/metrics"
    [control_endpoint] = monitors["fedgate-control-plane"]["spec"]["podMetricsEndpoints"]
    assert control_endpoint["port"] == "admin"
    control = monitors["fedgate-control-plane"]["spec"]
    [expr] = control["selector"]["matchExpressions"]
    assert expr == {
        "key": "app.kubernetes.io/name",
        "operator": "In",
        "values": ["fedgate-agent", "fedgate-gateway", "fedgate-controller"],
    }
    assert control["namespaceSelector"] == {"matchNames": ["fedgate-system"]}
    sidecars = monitors["fedgate-sidecars"]["spec"]
    # What the injector puts on a pod, so the two cannot drift apart.
    assert sidecars["selector"] == {"matchLabels": {INJECTED_LABEL: "true"}}
    [sidecar_endpoint] = sidecars["podMetricsEndpoints"]
    assert sidecar_endpoint["port"] == METRICS_PORT_NAME
    assert sidecars["namespaceSelector"] == {"any": True}


def test_the_scrape_config_keeps_the_same_pods_and_port() -> None:
    [config] = _docs(MONITORING / "prometheus-scrape.yaml")
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"fedgate-control-plane", "fedgate-sidecars"}
    for job in jobs.values():
        assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    ports = {
        name: {
            r["regex"]
            for r in job["relabel_configs"]
            if r.get("action") == "keep"
            and tuple(r["source_labels"]) == ("__meta_kubernetes_pod_container_port_name",)
        }
        for name, job in jobs.items()
    }
    assert ports == {"fedgate-control-plane": {"admin"}, "fedgate-sidecars": {METRICS_PORT_NAME}}
    control = jobs["fedgate-control-plane"]["relabel_configs"]
    name = ("__meta_kubernetes_pod_label_app_kubernetes_io_name",)
    assert any(
        tuple(r["source_labels"]) == name and r["regex"] == "fedgate-(agent|gateway|controller)"
        for r in control
    )
    # Prometheus's sanitised form of the injector's label.
    label = INJECTED_LABEL.replace(".", "_").replace("/", "_")
    sidecar = (f"__meta_kubernetes_pod_label_{label}",)
    assert any(
        tuple(r["source_labels"]) == sidecar and r["regex"] == "true"
        for r in jobs["fedgate-sidecars"]["relabel_configs"]
    )
