"""End to end on the rig: real namespaces, iptables capture, etcd, gateways, unmodified clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clusters.rig import bringup, lifecycle, topology
from fedgate.demo import curl_many
from mesh.model import ServicePort
from tests.e2e.conftest import PREFIX, rig_command
from tests.e2e.test_controller import west_state
from tests.helpers import until_sync

pytestmark = pytest.mark.rig

ECHO = "http://echo.demo.svc.clusterset.local:8080/"
PROBE = Path(__file__).with_name("probe.py")


def in_pod(rig: Path, target: str, argv: list[str], timeout: float = 20) -> str:
    cluster, _, pod = target.partition("/")
    record = lifecycle.load(rig).pod(cluster, pod)
    assert record is not None
    res = subprocess.run(
        ["ip", "netns", "exec", record.netns, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert res.returncode == 0, f"{argv} in {target} failed: {res.stderr}"
    return res.stdout


def test_call_reaches_a_service_that_exists_only_in_the_other_cluster(rig: Path) -> None:
    bringup.add_pod(
        rig,
        rig_command(),
        "west",
        "solo",
        "demo",
        "solo",
        [*rig_command().fedgate, "echo", "--cluster", "west", "--pod", "solo", "--port", "9090"],
        ("solo.demo", ServicePort("http", 9090, "HTTP")),
    )
    bringup.wait_routes(rig, "solo", "demo", 1)
    out = in_pod(
        rig,
        "east/client",
        ["curl", "-sS", "--max-time", "5", "http://solo.demo.svc.clusterset.local:9090/hello"],
    )
    answer = json.loads(out)
    assert answer["cluster"] == "west"
    assert answer["pod"] == "solo"
    assert answer["path"] == "/hello"


def test_weights_hold_within_tolerance(rig: Path) -> None:
    # Policy: local 70 / remote 30. Over 300 calls the binomial s.d. of east's share is 2.6
    # points; +-10 points is ~3.8 s.d., so a correct router fails this about once in 7,000 runs.
    counts, failures = curl_many(rig, "east/client", ECHO, 300)
    assert failures == 0
    share = counts["east"] / sum(counts.values())
    assert 0.60 <= share <= 0.80, counts


def test_non_http_tcp_client_reaches_the_other_cluster(rig: Path) -> None:
    bringup.add_redis(rig, rig_command(), "west")
    host = "redis.demo.svc.clusterset.local"
    assert in_pod(rig, "east/client", ["redis-cli", "-h", host, "SET", "k", "v1"]).strip() == "OK"
    assert in_pod(rig, "east/client", ["redis-cli", "-h", host, "GET", "k"]).strip() == "v1"


def _probe(rig: Path, netns: str, *args: str) -> dict[str, str]:
    res = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, str(PROBE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def _count(rig: Path, process: str, event: str) -> int:
    return lifecycle.log_path(rig, process).read_text().count(f'"event": "{event}"')


def _wait_count(rig: Path, process: str, event: str, expected: int) -> None:
    """The refusing process logs asynchronously to the client's error: poll, bounded."""
    count = until_sync(
        lambda: _count(rig, process, event),
        5,
        check=lambda n: n >= expected,
        what=f"{expected} x {event!r} from {process}",
        interval=0.05,
    )
    assert count == expected


# "valid" is the control: the same probe with a genuine east identity is served, so the
# refusals below are the verifiers' doing, not a broken probe.
@pytest.mark.parametrize("kind", ["valid", "none", "foreign-root", "wrong-domain"])
def test_bad_clients_are_refused_by_tunnel_and_sidecar(rig: Path, kind: str) -> None:
    state = lifecycle.load(rig)
    east = topology.cluster(state.prefix, 0)
    west = topology.cluster(state.prefix, 1)
    west_echo = state.pod("west", "echo-1")
    assert west_echo is not None
    west_root = str(bringup.ca_dir(rig, "west") / "root.pem")
    east_ca = str(bringup.ca_dir(rig, "east"))
    expected = "accepted" if kind == "valid" else "refused"
    # Every refusal is logged, with its reason, by the hop that refused.
    grew = 0 if kind == "valid" else 1
    tunnel_refusals = _count(rig, "west-gateway", "tunnel handshake refused")

    # The west gateway's QUIC tunnel, probed from the east cluster's network (across the WAN).
    quic = _probe(
        rig, east.netns, "quic", kind, west.wan_ip, str(topology.TUNNEL_PORT), west_root, east_ca
    )
    assert quic["result"] == expected, quic
    # (A valid tunnel stream reaches the sidecar with no inner TLS and is refused there: count
    # the sidecar's refusals from here on.)
    _wait_count(rig, "west-gateway", "tunnel handshake refused", tunnel_refusals + grew)
    inbound_refusals = _count(rig, "west-echo-1-sidecar", "inbound refused")
    # The west echo pod's sidecar inbound, probed from inside the west cluster's network.
    tls = _probe(
        rig,
        west.netns,
        "tls",
        kind,
        west_echo.ip,
        str(topology.SIDECAR_INBOUND_PORT),
        west_root,
        east_ca,
    )
    assert tls["result"] == expected, tls

    _wait_count(rig, "west-echo-1-sidecar", "inbound refused", inbound_refusals + grew)


def test_exports_of_a_cluster_whose_agent_stops_stay_routed_on_its_last_catalog(
    rig: Path,
) -> None:
    """Issue 15: a lost lease means "agent gone", not "cluster gone" (docs/controller.md)."""

    def west_endpoints() -> int:
        cfg = bringup.sidecar_config(rig, "east", "client")
        return sum(1 for e in bringup.endpoints_seen(cfg, "echo", "demo") if e["cluster"] == "west")

    assert west_endpoints() == 1
    agent = lifecycle.load(rig).process("west-agent")
    assert agent is not None
    os.kill(agent.pid, signal.SIGKILL)  # no chance to revoke its lease: it expires
    until_sync(
        lambda: west_state(rig, PREFIX),
        bringup.LEASE_TTL + 10,
        what="west Detached",
        interval=0.2,
        check=lambda s: s == (True, "Detached"),
    )
    assert west_endpoints() == 1  # still routed, on its last catalog
    # And east keeps answering, from both clusters (west's gateway and pods are fine).
    counts, failures = curl_many(rig, "east/client", ECHO, 20)
    assert failures == 0
    assert set(counts) == {"east", "west"}  # 30 % go to west: all 20 local is 0.08 %
