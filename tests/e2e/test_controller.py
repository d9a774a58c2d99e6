"""The control plane on the rig: 3 etcd members, 2 controller replicas, real sidecars.

One rig for the module (its own prefix, `<FEDGATE_TEST_RIG_PREFIX>h`, so it never meets the
session rig of the other e2e tests). Every test leaves the rig whole again (it restarts what it
killed), so they do not depend on their order.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusters.rig import bringup, control, lifecycle
from mesh.model import ServicePort
from tests.e2e.conftest import PREFIX, _why_no_rig, rig_command
from tests.helpers import until_sync

pytestmark = pytest.mark.rig

HA_PREFIX = (PREFIX + "h")[:8]
SOLO = "http://solo.demo.svc.clusterset.local:9090/"
PUSH = 2.0  # seconds allowed for one debounced sync and its push to every sidecar


@pytest.fixture(scope="module")
def ha_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    reason = _why_no_rig()
    if reason is not None:
        pytest.skip(reason)
    rig_dir = tmp_path_factory.mktemp("harig")
    lifecycle.down(rig_dir, HA_PREFIX)
    try:
        bringup.up(
            rig_dir,
            2,
            rig_command(),
            prefix=HA_PREFIX,
            progress=lambda m: None,
            etcd_members=3,
            controllers=2,
        )
        # A service that exists only in west: every call to it from east crosses the WAN.
        bringup.add_pod(
            rig_dir,
            rig_command(),
            "west",
            "solo",
            "demo",
            "solo",
            [
                *rig_command().fedgate,
                "echo",
                "--cluster",
                "west",
                "--pod",
                "solo",
                "--port",
                "9090",
            ],
            ("solo.demo", ServicePort("http", 9090, "HTTP")),
        )
        bringup.wait_routes(rig_dir, "solo", "demo", 1)
        yield rig_dir
    finally:
        lifecycle.down(rig_dir, HA_PREFIX)


def status(rig: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "fedgate", "status", "--rig-dir", str(rig), "--json"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    data: dict[str, object] = json.loads(out)
    return data


def leader_name(rig: Path) -> str:
    leader = status(rig)["leader"]
    assert isinstance(leader, dict)
    return str(leader.get("id", ""))


def wait_leader(rig: Path, timeout: float = 20) -> str:
    """The elected leader, once there is one (a previous test may have restarted replicas)."""
    return until_sync(
        lambda: leader_name(rig),
        timeout,
        what="a controller leader",
        interval=0.2,
        ignoring=(subprocess.CalledProcessError,),
    )


def kill(rig: Path, process: str) -> None:
    record = lifecycle.load(rig).process(process)
    assert record is not None, process
    os.kill(record.pid, signal.SIGKILL)


def sidecars(rig: Path) -> list[tuple[str, str]]:
    return [(p.cluster, p.name) for p in lifecycle.load(rig).pods]


def west_endpoints(rig: Path, cluster: str, pod: str) -> int:
    cfg = bringup.sidecar_config(rig, cluster, pod)
    return sum(
        1
        for name in ("echo", "solo")
        for e in bringup.endpoints_seen(cfg, name, "demo")
        if e["cluster"] == "west"
    )


def wait_all(rig: Path, check: object, timeout: float) -> dict[str, float]:
    """Seconds until `check(cluster, pod)` holds for each sidecar (polled)."""
    started = time.monotonic()
    done: dict[str, float] = {}
    while len(done) < len(sidecars(rig)):
        for cluster, pod in sidecars(rig):
            name = f"{cluster}/{pod}"
            if name not in done and check(cluster, pod):  # type: ignore[operator]
                done[name] = time.monotonic() - started
        if time.monotonic() - started > timeout:
            missing = sorted({f"{c}/{p}" for c, p in sidecars(rig)} - done.keys())
            pytest.fail(f"{missing} not there after {timeout:.0f} s")
        time.sleep(0.1)
    return done


def test_fedgate_status_shows_leader_clusters_and_services(ha_rig: Path) -> None:
    data = status(ha_rig)
    leader = data["leader"]
    assert isinstance(leader, dict)
    assert leader["id"] in ("controller", "controller-1")
    clusters = data["clusters"]
    assert isinstance(clusters, dict)
    assert {n: (c["lease"], c["routed"]) for n, c in clusters.items()} == {
        "east": ("alive", True),
        "west": ("alive", True),
    }
    services = {f"{s['name']}.{s['namespace']}": s for s in data["services"]}  # type: ignore[attr-defined]
    assert services["echo.demo"]["endpoints"] == {"east": 1, "west": 1}
    assert [c["type"] for c in services["echo.demo"]["conditions"]] == ["Valid"]
    assert services["solo.demo"]["endpoints"] == {"west": 1}
    text = subprocess.run(
        [sys.executable, "-m", "fedgate", "status", "--rig-dir", str(ha_rig)],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    assert "echo.demo" in text
    assert "Valid" in text
    assert f"leader    {leader['id']}" in text


def test_killed_agent_leaves_every_sidecar_within_the_lease_and_comes_back(
    ha_rig: Path,
) -> None:
    wait_all(ha_rig, lambda c, p: west_endpoints(ha_rig, c, p) == 2, 10)  # all settled
    kill(ha_rig, "west-agent")  # no chance to revoke its lease: expiry must remove it
    gone = wait_all(ha_rig, lambda c, p: west_endpoints(ha_rig, c, p) == 0, 30)
    print(f"west endpoints gone from every sidecar after {max(gone.values()):.1f} s")
    assert max(gone.values()) <= bringup.LEASE_TTL + PUSH, gone
    control.restart(ha_rig, "west-agent")
    back = wait_all(ha_rig, lambda c, p: west_endpoints(ha_rig, c, p) == 2, 30)
    print(f"west endpoints back in every sidecar {max(back.values()):.1f} s after restart")
    # One loss is never damped: it returns as soon as it republishes (+ one push).
    assert max(back.values()) <= 10, back


def traffic(rig: Path, seconds: float) -> subprocess.Popen[str]:
    """A bounded loop of calls from east to the west-only service, one line per call."""
    record = lifecycle.load(rig).pod("east", "client")
    assert record is not None
    script = (
        f"end=$(( $(date +%s) + {int(seconds)} )); "
        f'while [ "$(date +%s)" -lt "$end" ]; do '
        f"curl -s --noproxy '*' --max-time 5 {SOLO} || echo FAILED; echo; sleep 0.05; done"
    )
    return subprocess.Popen(
        ["ip", "netns", "exec", record.netns, "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def flowing(proc: subprocess.Popen[str], calls: int, timeout: float = 15.0) -> list[str]:
    """The first `calls` answers' lines, once they came (the traffic is flowing)."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while len([x for x in lines if x.strip()]) < calls:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"only {len(lines)} lines of traffic within {timeout} s: {lines}"
        line = proc.stdout.readline()
        assert line, f"the traffic ended early: {lines}"
        lines.append(line)
    return lines


def outcomes(proc: subprocess.Popen[str], seen: list[str] | None = None) -> tuple[int, list[str]]:
    out, _ = proc.communicate(timeout=60)
    ok, failed = 0, []
    for line in filter(None, (x.strip() for x in [*(seen or []), *out.splitlines()])):
        try:
            ok += json.loads(line)["cluster"] == "west"
        except (ValueError, KeyError, TypeError):
            failed.append(line)
    return ok, failed


def test_routing_survives_losing_every_controller(ha_rig: Path) -> None:
    for replica in control.load(ha_rig, HA_PREFIX).controllers:
        kill(ha_rig, replica.process)
    calls = traffic(ha_rig, 4)
    ok, failed = outcomes(calls)
    assert failed == []
    assert ok >= 10
    for replica in control.load(ha_rig, HA_PREFIX).controllers:
        control.restart(ha_rig, replica.process)
    bringup.wait_routes(ha_rig, "solo", "demo", 1)


def etcd_raft_leader(rig: Path) -> str:
    """The rig process name of the etcd member that leads raft."""
    plan = control.load(rig, HA_PREFIX)
    ids: dict[str, str] = {}
    leader = ""
    for member in plan.etcd:
        out = subprocess.run(
            ["ip", "netns", "exec", plan.netns, "curl", "-s", "--noproxy", "*", "-m", "2",
             "-X", "POST", "-d", "{}", f"http://{member.endpoint}/v3/maintenance/status"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout  # fmt: skip
        with_status = json.loads(out or "{}")
        if "header" in with_status:
            ids[with_status["header"]["member_id"]] = member.process
            leader = with_status.get("leader", leader)
    return ids[leader]


def test_killing_the_controller_leader_and_an_etcd_member_fails_no_request(
    ha_rig: Path,
) -> None:
    leader = wait_leader(ha_rig)
    member = etcd_raft_leader(ha_rig)
    calls = traffic(ha_rig, 12)
    try:
        seen = flowing(calls, 10)  # traffic flowing before the kills (outcome asserted below)
        kill(ha_rig, leader)
    except BaseException:
        calls.kill()
        calls.communicate()
        raise
    killed = time.monotonic()
    time.sleep(1)  # the scenario: a second failure one second into the first one's recovery
    kill(ha_rig, member)  # the raft leader: the harder loss
    new_leader = ""
    while time.monotonic() - killed < 15:
        try:
            new_leader = leader_name(ha_rig)
        except subprocess.CalledProcessError:
            new_leader = ""  # etcd is electing a new raft leader
        if new_leader and new_leader != leader:
            break
        time.sleep(0.2)
    took = time.monotonic() - killed
    ok, failed = outcomes(calls, seen)
    print(f"new leader {new_leader} after {took:.1f} s; {ok} calls, {len(failed)} failed")
    assert failed == [], f"{len(failed)} of {ok + len(failed)} calls failed: {failed[:3]}"
    assert ok >= 50
    assert new_leader not in ("", leader), "writes did not move to the other replica"
    # The controller's lease is 3 s, but etcd's new raft leader (elected ~0.5 s after its
    # leader died, 1 s after the controller) renews every lease for a full TTL: worst case
    # ~1.5 + 3 s, plus the polling of `fedgate status` through a recovering etcd.
    assert took < 2 * 3 + 3, f"new leader after {took:.1f} s (leader lease is 3 s)"
    # Writes work: a new service gets a VIP from the new leader and reaches the sidecars.
    bringup.add_pod(
        ha_rig,
        rig_command(),
        "west",
        "late",
        "demo",
        "late",
        [*rig_command().fedgate, "echo", "--cluster", "west", "--pod", "late", "--port", "9191"],
        ("late.demo", ServicePort("http", 9191, "HTTP")),
    )
    bringup.wait_routes(ha_rig, "late", "demo", 1, timeout=30)
    for process in (leader, member):
        control.restart(ha_rig, process)
