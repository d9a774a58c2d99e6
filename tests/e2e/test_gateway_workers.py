"""`fedgate gateway --workers 2` on the rig: the east gateway runs as a supervisor and two worker
processes sharing its listeners (SO_REUSEPORT). A worker is SIGSTOPped (a wedged loop) while
east's client pod calls a service that only west serves, through the shared egress port: the
supervisor kills the worker after 3 unanswered liveness probes and restarts it, and calls keep
succeeding; the only failures are calls the stopped worker held (its connections and accept
queue), before it was killed.

The module swaps the rig's east gateway for the supervised one and puts the original back.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusters.rig import bringup, cmd, lifecycle, procs, topology
from mesh.model import ServicePort
from tests.e2e.conftest import revive_agents, rig_command

pytestmark = pytest.mark.rig

PORT_STEP = 100  # worker 1's admin port: 15121 (15022, the default step's, is the agent's)
SERVICE_PORT = 9292  # the echo pod's --port below
URL = f"http://wk.demo.svc.clusterset.local:{SERVICE_PORT}/"
KILL_BOUND = 5.0  # seconds from SIGSTOP to the supervisor's SIGKILL


def admin(netns: str, port: int, path: str) -> str:
    return cmd.run_in(
        netns,
        ["curl", "-sS", "--noproxy", "*", "--max-time", "2", f"http://127.0.0.1:{port}{path}"],
    )


def log_events(path: Path, event: str) -> list[dict[str, object]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == event:
            out.append(entry)
    return out


def epoch(entry: dict[str, object]) -> float:
    return dt.datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00")).timestamp()


@pytest.fixture(scope="module")
def workers(rig: Path) -> Iterator[tuple[Path, str, int]]:
    """East's gateway as `--workers 2`; yields (rig, east netns, supervisor pid)."""
    state = lifecycle.load(rig)
    east = next(c for c in state.clusters if c.name == "east")
    netns = topology.cluster(state.prefix, east.index).netns
    original = state.process("east-gateway")
    assert original is not None
    revive_agents(rig)  # other modules of the session kill agents; the pod needs west's CA
    bringup.add_pod(
        rig,
        rig_command(),
        "west",
        "wk",
        "demo",
        "wk",
        [*rig_command().fedgate, "echo", "--cluster", "west", "--pod", "wk", "--port", "9292"],
        ("wk.demo", ServicePort("http", SERVICE_PORT, "HTTP")),
    )
    bringup.wait_routes(rig, "wk", "demo", 1)
    lifecycle.stop_process(rig, "east-gateway")
    name = "east-gateway-workers"
    try:
        record = lifecycle.start_process(
            rig,
            name,
            netns,
            [*original.argv, "--workers", "2", "--worker-port-step", str(PORT_STEP)],
        )
        for i in range(2):
            port = topology.GATEWAY_ADMIN_PORT + i * PORT_STEP
            procs.wait_http_ok(
                netns,
                f"http://127.0.0.1:{port}/readyz",
                60,
                log_path=lifecycle.log_path(rig, name),
                pid=record.pid,
            )
        yield rig, netns, record.pid
    finally:
        if lifecycle.load(rig).process(name) is not None:
            lifecycle.stop_process(rig, name)  # SIGTERM: the supervisor stops its workers
        lifecycle.start_process(rig, "east-gateway", netns, original.argv)
        procs.wait_http_ok(netns, f"http://127.0.0.1:{topology.GATEWAY_ADMIN_PORT}/readyz", 60)


def calls_in_background(rig: Path, seconds: int) -> subprocess.Popen[str]:
    """curl from east's client pod, one call at a time, for `seconds` (bounded): one line per
    call, `<epoch> <http code>` (000: no answer within 2 s)."""
    record = lifecycle.load(rig).pod("east", "client")
    assert record is not None
    script = (
        f"end=$(( $(date +%s) + {seconds} )); while [ $(date +%s) -lt $end ]; do"
        f" t=$(date +%s.%N); c=$(curl -s --noproxy '*' --max-time 2 -o /dev/null"
        f" -w '%{{http_code}}' {URL}); echo \"$t $c\"; sleep 0.05; done"
    )
    return subprocess.Popen(
        ["ip", "netns", "exec", record.netns, "sh", "-c", script],
        stdout=subprocess.PIPE,
        text=True,
    )


def worker_pids(supervisor: int) -> list[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(pid) for pid in children]


def test_a_wedged_worker_is_killed_and_restarted_and_calls_go_on(
    workers: tuple[Path, str, int],
) -> None:
    rig, netns, supervisor = workers
    log = lifecycle.log_path(rig, "east-gateway-workers")
    configs = [
        json.loads(admin(netns, topology.GATEWAY_ADMIN_PORT + i * PORT_STEP, "/config"))
        for i in range(2)
    ]
    assert [c["status"]["cluster"] for c in configs] == ["east", "east"]
    # Only worker 0 serves QUIC (a UDP port cannot be shared); both share the TCP listeners.
    assert (
        configs[0]["status"]["listeners"]["egress"] == configs[1]["status"]["listeners"]["egress"]
    )
    assert configs[1]["status"]["listeners"]["tunnel"] is None
    started = {int(str(e["worker"])): int(str(e["pid"])) for e in log_events(log, "worker started")}
    assert sorted(started.values()) == sorted(worker_pids(supervisor))
    load = calls_in_background(rig, 14)
    try:
        # Calls flow first; then stop the worker whose egress carries the client's calls (the
        # sidecar pools its inner connection: one CONNECT carries many calls).
        deadline = time.monotonic() + 10
        held = {}
        while time.monotonic() < deadline:
            held = {
                i: json.loads(admin(netns, topology.GATEWAY_ADMIN_PORT + i * PORT_STEP, "/config"))[
                    "status"
                ]["counters"]["egress"]["calls"]
                for i in range(2)
            }
            if sum(held.values()) >= 1:
                break
            time.sleep(0.1)  # polled with the deadline above
        assert sum(held.values()) >= 1, f"no calls through the egress: {held}"
        # Liveness counts once a worker answered its first probe (before, only the start-up
        # timeout does): stop one only when the supervisor has seen both live.
        while len({e["worker"] for e in log_events(log, "worker live")}) < 2:
            assert time.monotonic() < deadline, "the supervisor never saw both workers live"
            time.sleep(0.05)  # polled with the deadline above
        victim = max(held, key=lambda i: held[i])
        pid = started[victim]
        t0 = time.time()
        os.kill(pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 10
            while not log_events(log, "worker not live, killing it"):
                assert time.monotonic() < deadline, "the supervisor never killed the worker"
                time.sleep(0.05)  # polled with the deadline above
        finally:
            with contextlib.suppress(ProcessLookupError):  # never leave it stopped
                os.kill(pid, signal.SIGCONT)
        (kill,) = log_events(log, "worker not live, killing it")
        assert kill["pid"] == pid
        assert "3 liveness probes unanswered" in str(kill["reason"])
        killed_after = epoch(kill) - t0
        out, _ = load.communicate(timeout=30)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
        if load.stdout is not None:
            load.stdout.close()  # after a failure nobody read it: no unclosed pipe for GC
    restarted = [e for e in log_events(log, "worker started") if e["worker"] == victim]
    assert len(restarted) == 2  # the first start and the restart
    restarted_after = epoch(restarted[-1]) - t0
    calls = [(float(t) - t0, code) for t, code in (line.split() for line in out.splitlines())]
    failed = [t for t, code in calls if code != "200"]
    print(
        f"\nworkers: worker {victim} SIGSTOPped: killed {killed_after:.2f} s after,"
        f" restarted {restarted_after:.2f} s after; {len(failed)} of {len(calls)} calls failed"
        f" (started at {', '.join(f'{t:.2f}' for t in failed) or '-'} s from the stop)"
    )
    assert killed_after <= KILL_BOUND
    assert restarted_after <= KILL_BOUND + 1
    # Only calls the stopped worker held failed (a curl gives up after 2 s): none started
    # after it was killed, when the kernel hands new connections to the live worker only.
    assert all(-2.5 < t < killed_after for t in failed)
    assert sum(1 for t, code in calls if t > killed_after and code == "200") >= 10
    # The restarted worker serves again: ready on its admin port.
    port = topology.GATEWAY_ADMIN_PORT + victim * PORT_STEP
    procs.wait_http_ok(netns, f"http://127.0.0.1:{port}/readyz", 60)
