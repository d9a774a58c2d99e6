"""Retries that save the call, end to end on the rig (issue 15): a remote gateway SIGKILLed, and
an upstream HTTP/2 server that sends GOAWAY every 100 requests.

Before, one call failed about every 5 s for as long as west's gateway stayed down: the first
try after each 5 s window of "peer unreachable" went to the dead gateway and was not retried.
Now that try is retried on another cluster (Istio's default retries, Envoy's previous-hosts
predicate extended to clusters), so no call fails. Health marking of the dead peer is the
resilience work's; this asserts what retries alone guarantee.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusters.rig import bringup, control, lifecycle
from fedgate.demo import curl_many
from mesh.model import ServicePort
from tests.e2e.conftest import rig_command
from tests.helpers import until_sync

pytestmark = pytest.mark.rig

ECHO = "http://echo.demo.svc.clusterset.local:8080/"
PEER = Path(__file__).parent.parent / "h2_goaway_peer.py"
LIMITED = "limited.demo.svc.clusterset.local"


def test_a_killed_remote_gateway_costs_no_http_call(rig: Path) -> None:
    counts, failures = curl_many(rig, "east/client", ECHO, 40)  # policy: 70 local / 30 remote
    assert failures == 0
    assert counts["west"] > 0
    gateway = lifecycle.load(rig).process("west-gateway")
    assert gateway is not None
    os.kill(gateway.pid, signal.SIGKILL)
    killed = time.monotonic()
    try:
        # Sequential calls for > 10 s: at least two 5 s windows of "peer unreachable" end
        # while the gateway is dead, and the first try of each new window meets it.
        calls = failed = 0
        seen: dict[str, int] = {}
        while time.monotonic() - killed < 12:
            counts, failures = curl_many(rig, "east/client", ECHO, 50)
            calls += 50
            failed += failures
            for cluster, n in counts.items():
                seen[cluster] = seen.get(cluster, 0) + n
        print(f"\nwest gateway SIGKILLed: {calls} calls, {failed} failed, answered by {seen}")
        assert failed == 0
        assert set(seen) == {"east"}
    finally:
        control.restart(rig, "west-gateway")


def _load(rig: Path, requests: int, conns: int, streams: int) -> dict[str, int]:
    """The h2 load client in east/client (through its sidecar, the gateways, west's sidecar)."""
    client = lifecycle.load(rig).pod("east", "client")
    assert client is not None
    argv = [sys.executable, str(PEER), "load", LIMITED, "9092", str(requests)]
    res = subprocess.run(
        ["ip", "netns", "exec", client.netns, *argv, str(conns), str(streams)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    counts: dict[str, int] = json.loads(res.stdout)
    return counts


def test_an_upstream_http2_goaway_every_100_requests_costs_no_call(rig: Path) -> None:
    serve = [sys.executable, str(PEER), "serve", "127.0.0.1", "9092"]
    port = ServicePort("http2", 9092, "HTTP2")
    bringup.add_pod(
        rig, rig_command(), "west", "limited", "demo", "limited", serve, ("limited.demo", port)
    )
    bringup.wait_routes(rig, "limited", "demo", 1)
    until_sync(
        lambda: _load(rig, 10, 1, 1),
        30,
        check=lambda c: c == {"200": 10},
        what="the limited h2 server answers",
        ignoring=(AssertionError,),
    )
    counts = _load(rig, 2_000, 10, 10)  # 10 connections x 10 streams
    status = bringup.sidecar_config(rig, "east", "client")["status"]
    assert isinstance(status, dict)
    print(
        f"\nGOAWAY every 100 requests, 2,000 over 10 x 10: {counts}; east client h2"
        f" {status.get('h2')}"
    )
    assert counts == {"200": 2_000}
