"""The rig as an operator drives it, through the `fedgate rig` CLI (issues 15 and 16):

- `rig up` returns only once a controller leads and every cluster is live, and says so; a
  service exported in the same second resolves (it gets its VIP from that leader);
- north shares west's pod subnet (`--pod-cidr-overlap`): east calls services in both, each of
  them calls the other's, and every call is answered by the cluster that owns the service,
  though the pods' addresses are equal;
- a pod from `rig run` exports traces to the rig's `--otlp-endpoint` like the others;
- a killed process comes back (restart policy Always) and `rig status` counts the restart;
- `rig down` stops everything and removes etcd's data.

Its own three-cluster rig (prefix `<FEDGATE_TEST_RIG_PREFIX>o`), so the session
rig's tests, which kill processes and expect them to stay dead, are unaffected.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clusters import source
from clusters.rig import lifecycle, netns, supervisor
from mesh import telemetry as tm
from mesh.model import ServicePort
from tests.e2e.conftest import PREFIX, _why_no_rig
from tests.e2e.otlp import CollectedSpan, Collector
from tests.helpers import until_sync

OPS_PREFIX = (PREFIX + "o")[:8]
FEDGATE = [sys.executable, "-m", "fedgate"]
UP_TIMEOUT = 400  # three clusters on a busy 2-core machine
pytestmark = [pytest.mark.rig, pytest.mark.timeout(UP_TIMEOUT + 120)]


@dataclass(frozen=True)
class OpsRig:
    dir: Path
    up_output: str
    export_lag: float  # seconds from `rig up` returning to the export being written
    collector: Collector


def fedgate(rig_dir: Path, *args: str, timeout: float = 60) -> str:
    words = 2 if args[0] == "rig" else 1  # --rig-dir before any `-- argv` of the command
    done = subprocess.run(
        [*FEDGATE, *args[:words], "--rig-dir", str(rig_dir), *args[words:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"fedgate {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpsRig]:
    reason = _why_no_rig()
    if reason is not None:
        pytest.skip(reason)
    collector = Collector()
    collector.start(f"unix:{tmp_path_factory.mktemp('otlp-ops') / 'otlp.sock'}")
    rig_dir = tmp_path_factory.mktemp("ops-rig")
    lifecycle.down(rig_dir, OPS_PREFIX)
    try:
        out = fedgate(
            rig_dir,
            "rig",
            "up",
            "--clusters",
            "3",
            "--pod-cidr-overlap",
            "--prefix",
            OPS_PREFIX,
            "--otlp-endpoint",
            collector.endpoint,
            "--restart-backoff-max",
            "4",
            timeout=UP_TIMEOUT,
        )
        returned = time.monotonic()
        # A ServiceExport (and its ready endpoint: west's echo pod) in the same second as
        # `rig up` returns (issue 15).
        exports = source.exports_path(rig_dir, "west")
        source.add_export(exports, "demo", "early", [ServicePort("http", 8080, "HTTP")])
        echo = lifecycle.load(rig_dir).pod("west", "echo-1")
        assert echo is not None
        source.add_endpoint(exports, "demo", "early", "echo-1", echo.ip, echo.service_account)
        yield OpsRig(rig_dir, out, time.monotonic() - returned, collector)
    finally:
        lifecycle.down(rig_dir, OPS_PREFIX)
        collector.stop()


def netns_of(rig: Path, cluster: str, pod: str) -> str:
    record = lifecycle.load(rig).pod(cluster, pod)
    assert record is not None, (cluster, pod)
    return record.netns


def resolve(rig: Path, name: str) -> str:
    """What the pod east/client's resolver (its sidecar's DNS) answers for `name`."""
    done = subprocess.run(
        ["ip", "netns", "exec", netns_of(rig, "east", "client"), "getent", "hosts", name],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return done.stdout.split()[0] if done.returncode == 0 and done.stdout else ""


def call(rig: Path, url: str, *headers: str, source: str = "east") -> dict[str, object]:
    """One curl from `<source>/client` (default east) through its sidecar."""
    argv = ["curl", "-sS", "--noproxy", "*", "--max-time", "5", "--retry", "0"]
    for h in headers:
        argv += ["-H", h]
    done = subprocess.run(
        ["ip", "netns", "exec", netns_of(rig, source, "client"), *argv, url],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    try:
        data: dict[str, object] = json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"not an echo answer: {done.stdout[:200]!r}") from None
    return data


def run_echo(rig: Path, cluster: str, pod: str, service: str) -> None:
    fedgate(
        rig,
        "rig",
        "run",
        f"{cluster}/{pod}",
        "--export",
        f"{service}.demo:8080/HTTP",
        "--",
        *FEDGATE,
        "echo",
        "--cluster",
        cluster,
        "--pod",
        pod,
        "--port",
        "8080",
        timeout=120,
    )


def test_rig_up_returns_with_a_leader_and_live_clusters_and_an_early_export_resolves(
    ops: OpsRig,
) -> None:
    said = re.search(r"leader (\S+) elected; clusters (.+) live", ops.up_output)
    assert said is not None, ops.up_output
    assert said.group(2) == "east, north, west"
    assert ops.export_lag < 1.0
    vip = until_sync(
        lambda: resolve(ops.dir, "early.demo.svc.clusterset.local"),
        20,
        what="early.demo resolving from east/client",
        interval=0.3,
    )
    assert vip.startswith("10.255."), vip
    url = "http://early.demo.svc.clusterset.local:8080/"
    answer = until_sync(
        lambda: call(ops.dir, url), 20, what="early.demo answering", ignoring=(AssertionError,)
    )
    assert answer["cluster"] == "west"


def test_east_reaches_west_and_north_though_their_pod_cidrs_overlap(ops: OpsRig) -> None:
    state = lifecycle.load(ops.dir)
    west, north = state.cluster("west"), state.cluster("north")
    assert west is not None
    assert north is not None
    assert west.pod_subnet == north.pod_subnet == "10.2.0.0/24"
    run_echo(ops.dir, "west", "svc", "onlywest")
    run_echo(ops.dir, "north", "svc", "onlynorth")
    addresses = {c: lifecycle.load(ops.dir).pod(c, "svc") for c in ("west", "north")}
    assert addresses["west"] is not None
    assert addresses["north"] is not None
    assert addresses["west"].ip == addresses["north"].ip  # the same pod address in both

    # East calls both; and each of west and north calls the other's service, whose pod has the
    # caller's own pod's address: only routing by name (never by pod IP) gets these right.
    cases = (
        ("east", "onlywest", "west"),
        ("east", "onlynorth", "north"),
        ("north", "onlywest", "west"),
        ("west", "onlynorth", "north"),
    )
    for source_cluster, service, cluster in cases:
        url = f"http://{service}.demo.svc.clusterset.local:8080/"
        until_sync(
            lambda u=url, c=source_cluster: call(ops.dir, u, source=c),  # type: ignore[misc]
            30,
            what=f"{service} answering {source_cluster}",
            ignoring=(AssertionError,),
        )
        answers = [call(ops.dir, url, source=source_cluster)["cluster"] for _ in range(10)]
        assert answers == [cluster] * 10, (source_cluster, service, answers)

    # The controller keeps equal addresses of different clusters apart (endpoints, VIPs).
    status = json.loads(fedgate(ops.dir, "status", "--json"))
    services = {s["name"]: s for s in status["services"]}
    assert services["echo"]["endpoints"] == {"east": 1, "north": 1, "west": 1}
    assert services["onlywest"]["endpoints"] == {"west": 1}
    assert services["onlynorth"]["endpoints"] == {"north": 1}
    assert services["onlywest"]["vip"] != services["onlynorth"]["vip"]


def test_a_pod_from_rig_run_exports_traces_to_the_rigs_collector(ops: OpsRig) -> None:
    record = lifecycle.load(ops.dir).process("north-svc-sidecar")
    if record is None:  # runs alone: the overlap test did not add it
        run_echo(ops.dir, "north", "svc", "onlynorth")
        record = lifecycle.load(ops.dir).process("north-svc-sidecar")
    assert record is not None
    assert ops.collector.endpoint in record.argv
    trace_id = secrets.token_hex(16)
    url = "http://onlynorth.demo.svc.clusterset.local:8080/traced"
    until_sync(
        lambda: call(ops.dir, url, f"traceparent: 00-{trace_id}-{secrets.token_hex(8)}-01"),
        30,
        what="onlynorth answering",
        ignoring=(AssertionError,),
    )

    def served(spans: list[CollectedSpan]) -> bool:
        return any(s.attributes.get(tm.HOP) == tm.DESTINATION for s in spans)

    spans = ops.collector.wait_trace(trace_id, served)
    assert served(spans), [(s.service, s.attributes.get(tm.HOP)) for s in spans]


def _status_line(rig: Path, process: str) -> str:
    out = fedgate(rig, "rig", "status")
    return next((ln for ln in out.splitlines() if ln.split()[:1] == [process]), "")


def test_a_killed_gateway_is_restarted_and_rig_status_counts_it(ops: OpsRig) -> None:
    assert "restart policy Always, supervisor pid" in fedgate(ops.dir, "rig", "status")
    record = lifecycle.load(ops.dir).process("west-gateway")
    assert record is not None
    assert " restarts=0 " in _status_line(ops.dir, "west-gateway")
    os.kill(record.pid, signal.SIGKILL)
    line = until_sync(
        lambda: _status_line(ops.dir, "west-gateway"),
        30,
        check=lambda ln: " up " in ln and " restarts=1 " in ln,
        what="west-gateway restarted",
        interval=0.5,
    )
    assert f"pid {record.pid} " not in line
    # And it serves again: a west-only service answers from east.
    until_sync(
        lambda: call(ops.dir, "http://onlywest.demo.svc.clusterset.local:8080/")["cluster"],
        30,
        check=lambda c: c == "west",
        what="onlywest answering through the restarted gateway",
        ignoring=(AssertionError,),
        interval=0.5,
    )


def test_rig_down_removes_every_process_namespace_and_etcds_data(ops: OpsRig) -> None:
    state = lifecycle.load(ops.dir)
    data = lifecycle.etcd_data_dir(ops.dir, "etcd")
    assert data.is_dir()
    assert supervisor.pid_path(ops.dir).exists()
    fedgate(ops.dir, "rig", "down", timeout=120)
    assert not data.exists()
    assert not supervisor.pid_path(ops.dir).exists()
    assert [n for n in netns.list_netns() if n.startswith(f"{OPS_PREFIX}-")] == []
    for p in state.processes:
        assert not Path(f"/proc/{p.pid}").exists() or _zombie(p.pid), p.name


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].startswith(("Z", "X"))
