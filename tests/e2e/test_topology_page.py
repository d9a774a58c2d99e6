"""The controller's topology page in real headless Chromium against the rig, plus the other
operator surfaces that read the same processes (`/metrics`, `fedgate status`, `fedgate top`,
and their logs: JSON, every line).

Chromium runs inside the control namespace (where the controller's admin port listens) with
`--dump-dom`, which prints the DOM after the page's scripts ran: the test reads the page's
`data-*` attributes from it. The page must show both clusters, both gateway links and the
echo service; then west's gateway is killed and the page must show west's gateway down and
both links down; west's gateway is restarted (the rig is left whole for other modules).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest

from clusters.rig import control, lifecycle
from fedgate import rates
from tests.helpers import until_sync

pytestmark = pytest.mark.rig

CHROMIUM = shutil.which("chromium")
ECHO = "http://echo.demo.svc.clusterset.local:8080/"


State = dict[str, dict[str, dict[str, str]]]  # kind -> name -> the element's attributes


class Elements(HTMLParser):
    """Every element's attributes, in document order (the DOM as Chromium dumped it)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append({"tag": tag, **{k: v or "" for k, v in attrs}})


class Page:
    def __init__(self, rig: Path, tmp: Path) -> None:
        plan = control.load(rig, lifecycle.load(rig).prefix)
        self.netns = plan.netns
        self.admin = plan.controllers[0].admin
        self.url = f"http://{self.admin}/topology"
        self.profile = tmp / "chromium-profile"
        self.tmp = tmp

    def _chromium(self, *args: str) -> str:
        assert CHROMIUM is not None
        done = subprocess.run(
            ["ip", "netns", "exec", self.netns, CHROMIUM, "--headless=new", "--no-sandbox",
             "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={self.profile}", "--virtual-time-budget=2500", *args, self.url],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    def elements(self) -> list[dict[str, str]]:
        parser = Elements()
        parser.feed(self._chromium("--dump-dom"))
        return parser.found

    def screenshot(self, name: str) -> Path:
        path = self.tmp / name
        self._chromium(f"--screenshot={path}", "--window-size=1280,900")
        assert path.stat().st_size > 10_000, "the screenshot is (nearly) empty"
        print(f"topology screenshot: {path}")
        return path


def view(elements: list[dict[str, str]]) -> State:
    """The page's state by kind: clusters, links (map), link rows, services."""
    out: State = {"cluster": {}, "link": {}, "service": {}}
    for e in elements:
        if e["tag"] == "g" and "data-cluster" in e:
            out["cluster"][e["data-cluster"]] = e
        elif e["tag"] == "g" and "data-link" in e:
            out["link"][e["data-link"]] = e
        elif e["tag"] == "tr" and "data-service" in e:
            out["service"][e["data-service"]] = e
    # echo.demo's endpoints per cluster (other modules of the session add other services)
    endpoints = [e for e in elements if e.get("data-endpoints-service") == "echo.demo"]
    out["endpoints"] = {e["data-endpoints-cluster"]: e for e in endpoints}
    return out


def wait_for(page: Page, check: Callable[[State], bool], timeout: float) -> tuple[State, float]:
    """The page's first state that passes `check`, and the seconds it took."""
    started = time.monotonic()
    state = until_sync(
        lambda: view(page.elements()), timeout, check=check, what="the page's state", interval=0.3
    )
    return state, time.monotonic() - started


def cross_cluster_calls(rig: Path, within: float = 30.0) -> None:
    """From each cluster's client until one answer came from the other cluster (bounded):
    tunnels are dialled on the first call, so each direction needs one. Bounded by time, not
    by count: right after a gateway restart the first calls are refused, and a sidecar told
    the peer is unreachable keeps off it for a few seconds (sidecar.traffic.peers)."""
    for here, there in (("east", "west"), ("west", "east")):
        pod = lifecycle.load(rig).pod(here, "client")
        assert pod is not None
        deadline = time.monotonic() + within
        while True:
            out = subprocess.run(
                ["ip", "netns", "exec", pod.netns, "curl", "-s", "--noproxy", "*", "-m", "5",
                 "-H", "connection: close", ECHO],
                capture_output=True, text=True, timeout=15, check=False,
            ).stdout  # fmt: skip
            try:
                if json.loads(out)["cluster"] == there:
                    break
            except (ValueError, KeyError, TypeError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"calls from {here} never reached {there} within {within:.0f} s")
            time.sleep(0.1)


def healthy(state: State) -> bool:
    clusters, links = state["cluster"], state["link"]
    return (
        {n: (c["data-state"], c["data-gateway"]) for n, c in clusters.items()}
        == {"east": ("Live", "up"), "west": ("Live", "up")}
        and {k: v["data-health"] for k, v in links.items()}
        == {"east->west": "up", "west->east": "up"}
        and "echo.demo" in state["service"]
        and {c: e["data-count"] for c, e in state["endpoints"].items()}
        == {"east": "1", "west": "1"}
    )


def west_gateway_down(state: State) -> bool:
    links = state["link"]
    return (
        state["cluster"].get("west", {}).get("data-gateway") == "down"
        and state["cluster"].get("east", {}).get("data-gateway") == "up"
        and links.get("east->west", {}).get("data-health") == "down"
        and links.get("west->east", {}).get("data-health") == "down"
    )


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")
def test_topology_page_shows_the_federation_and_a_gateway_going_down(
    rig: Path, tmp_path: Path
) -> None:
    page = Page(rig, tmp_path)
    cross_cluster_calls(rig)
    _, took = wait_for(page, healthy, 20)
    print(f"page healthy after {took:.1f} s")
    page.screenshot("topology-healthy.png")

    record = lifecycle.load(rig).process("west-gateway")
    assert record is not None
    os.kill(record.pid, signal.SIGKILL)
    killed = time.monotonic()
    try:
        state, took = wait_for(page, west_gateway_down, 15)
        print(f"page shows west's gateway down {time.monotonic() - killed:.1f} s after the kill")
        assert state["cluster"]["west"]["data-state"] == "Live"  # its agent still holds the lease
        page.screenshot("topology-west-gateway-down.png")
    finally:
        control.restart(rig, "west-gateway")
    cross_cluster_calls(rig)  # re-dials the tunnels to the new west gateway
    _, took = wait_for(page, healthy, 30)
    print(f"page healthy again {took:.1f} s after the restart and calls")


def test_metrics_status_and_top_read_the_same_processes(rig: Path) -> None:
    cross_cluster_calls(rig)
    plan = control.load(rig, lifecycle.load(rig).prefix)

    def get(netns: str, url: str) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", netns, "curl", "-sS", "--fail", "-m", "5", url],
            capture_output=True, text=True, timeout=15, check=True,
        ).stdout  # fmt: skip

    # Every replica: each proxy streams its config from one of them, picked at random.
    ctls = [
        rates.parse(get(plan.netns, f"http://{c.admin}/metrics"), 0.0) for c in plan.controllers
    ]

    def named(name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {k: v for ctl in ctls for k, v in ctl.named(name).items()}

    acks = named("fedgate_config_acks_total")
    kinds = {dict(labels)["kind"] for labels in acks}
    assert kinds == {"gateway", "sidecar"}, acks
    assert named("fedgate_config_push_latency_seconds_count")
    expiry = named("fedgate_certificate_expiry_timestamp_seconds")
    roots = {dict(k)["trust_domain"] for k in expiry if dict(k)["kind"] == "root"}
    assert {"east.fedgate.local", "west.fedgate.local", "fedgate.local"} <= roots
    assert all(v > time.time() for v in expiry.values())
    assert named("fedgate_gitops_applied_commit_info")

    east = lifecycle.load(rig).cluster("east")
    assert east is not None
    gw = rates.parse(get(plan.netns, f"http://{east.wan_ip}:15020/metrics"), 0.0)
    pair = {"source_cluster": "east", "destination_cluster": "west", "transport": "tls"}
    assert gw.value("fedgate_tunnel_up", **pair) == 1.0
    assert (gw.value("fedgate_tunnel_streams_total", **pair) or 0) >= 1
    assert (gw.value("fedgate_tunnel_handshakes_total", **pair, result="ok") or 0) >= 1
    versions = gw.named("fedgate_config_version_info")
    assert [dict(k)["version"] for k in versions] != [""]
    # The metrics-only listener on the WAN does not serve the running config.
    refused = subprocess.run(
        ["ip", "netns", "exec", plan.netns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
         "-m", "5", f"http://{east.wan_ip}:15020/config"],
        capture_output=True, text=True, timeout=15, check=False,
    ).stdout  # fmt: skip
    assert refused == "404"

    status = subprocess.run(
        [sys.executable, "-m", "fedgate", "status", "--rig-dir", str(rig), "--json"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    gateways = json.loads(status)["gateways"]
    assert {n: g["up"] for n, g in gateways["clusters"].items()} == {"east": True, "west": True}
    assert {f"{x['source']}->{x['destination']}": x["health"] for x in gateways["links"]} == {
        "east->west": "up",
        "west->east": "up",
    }
    top = subprocess.run(
        [sys.executable, "-m", "fedgate", "top", "--rig-dir", str(rig), "--once", "--json",
         "--interval", "0.5"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    table = json.loads(top)
    assert table["unreachable"] == []
    assert table["seconds"] >= 0.5


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")
def test_topology_page_shows_a_cluster_whose_agent_died_as_detached(
    rig: Path, tmp_path: Path
) -> None:
    """A dead agent is not a dead cluster (docs/controller.md, "Detached"): the page shows west
    Detached, still routed on its last catalog, and Live again once its agent is back."""
    page = Page(rig, tmp_path)
    cross_cluster_calls(rig)
    wait_for(page, healthy, 20)
    record = lifecycle.load(rig).process("west-agent")
    assert record is not None
    os.kill(record.pid, signal.SIGKILL)  # no lease revocation: etcd expires it
    killed = time.monotonic()
    try:
        state, _ = wait_for(
            page, lambda s: s["cluster"].get("west", {}).get("data-state") == "Detached", 20
        )
        print(f"page shows west Detached {time.monotonic() - killed:.1f} s after its agent died")
        assert state["cluster"]["east"]["data-state"] == "Live"
        assert "west" in state["endpoints"]  # still routed on its last catalog
        page.screenshot("topology-west-detached.png")
    finally:
        control.restart(rig, "west-agent")
    _, took = wait_for(
        page,
        lambda s: (
            s["cluster"].get("west", {}).get("data-state") == "Live" and "west" in s["endpoints"]
        ),
        30,
    )
    print(f"page shows west Live again {took:.1f} s after its agent restarted")
    cross_cluster_calls(rig)
    wait_for(page, healthy, 20)


def test_every_line_a_fedgate_process_logged_is_json(rig: Path) -> None:
    """Last in the module, so the logs hold the kills and restarts above; gRPC's C core lines
    included (`fedgate.native_logs`). etcd's log is etcd's own, and a workload's (redis, the
    gRPC echo) is the workload's: only processes running `fedgate` count."""
    cross_cluster_calls(rig)
    fedgate = [
        p
        for p in lifecycle.load(rig).processes
        if "fedgate" in p.argv[:3] or any(a.endswith("/fedgate") for a in p.argv[:1])
    ]
    logs = sorted(Path(p.log_path) for p in fedgate if Path(p.log_path).exists())
    assert len(logs) >= 10, logs
    for log in logs:
        for n, line in enumerate(log.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                pytest.fail(f"{log.name}:{n} is not JSON: {line[:300]!r}")
            assert isinstance(entry, dict), f"{log.name}:{n}"
