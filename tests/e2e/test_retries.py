"""Retries that save the call, end to end on the rig (issue 15): a remote gateway SIGKILLed.

Before, one call failed about every 5 s for as long as west's gateway stayed down: the first
try after each 5 s window of "peer unreachable" went to the dead gateway and was not retried.
Now that try is retried on another cluster (Istio's default retries, Envoy's previous-hosts
predicate extended to clusters), so no call fails. Health marking of the dead peer is the
resilience work's; this asserts what retries alone guarantee.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from clusters.rig import control, lifecycle
from fedgate.demo import curl_many

pytestmark = pytest.mark.rig

ECHO = "http://echo.demo.svc.clusterset.local:8080/"


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
