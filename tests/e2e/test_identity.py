"""Identity end to end on its own rig with 10 s SVIDs: renewals under a long-lived connection,
a root rotation under continuous traffic, and the deny list (real processes, real etcd)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from ca.authority import root_id
from clusters.rig import bringup, lifecycle, topology
from tests.e2e.conftest import PREFIX, _why_no_rig, rig_command
from tests.helpers import until_sync

pytestmark = pytest.mark.rig

SVID_TTL = 10  # renewals every 4-6 s (half life +- 10 %)
CLIENT_PY = Path(__file__).with_name("identity_client.py")
REDIS = "redis.demo.svc.clusterset.local"
ECHO = "http://echo.demo.svc.clusterset.local:8080/"
EAST_CLIENT = "spiffe://east.fedgate.local/ns/demo/sa/client"
# A rig of its own (prefix fgai for fga): short TTLs, rotations and denials must not disturb
# the shared e2e rig. It starts with the shared prefix, so it is still "ours" to sweep.
ID_PREFIX = (PREFIX[:7] + "i") if len(PREFIX) >= 8 else PREFIX + "i"


@pytest.fixture(scope="module")
def idrig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    reason = _why_no_rig()
    if reason is not None:
        pytest.skip(reason)
    rig_dir = tmp_path_factory.mktemp("idrig")
    lifecycle.down(rig_dir, ID_PREFIX)
    try:
        bringup.up(
            rig_dir, 2, rig_command(), prefix=ID_PREFIX, progress=lambda m: None, svid_ttl=SVID_TTL
        )
        bringup.add_redis(rig_dir, rig_command(), "west")
        yield rig_dir
    finally:
        lifecycle.down(rig_dir, ID_PREFIX)


# --- helpers -----------------------------------------------------------------------------------


def pod_netns(rig: Path, target: str) -> str:
    cluster, _, pod = target.partition("/")
    record = lifecycle.load(rig).pod(cluster, pod)
    assert record is not None
    return record.netns


def cluster_netns(rig: Path, cluster: str) -> str:
    state = lifecycle.load(rig)
    index = next(c.index for c in state.clusters if c.name == cluster)
    return topology.cluster(state.prefix, index).netns


def admin(netns: str, port: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            netns,
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "2",
            f"http://127.0.0.1:{port}/config",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def start_client(rig: Path, target: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", pod_netns(rig, target), sys.executable, str(CLIENT_PY), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_connected(proc: subprocess.Popen[str], timeout: float) -> None:
    """Until a `hold` client says its long-lived connection answered a first PING."""
    assert proc.stderr is not None
    ready, _, _ = select.select([proc.stderr], [], [], timeout)
    assert ready, f"the client did not connect within {timeout} s"
    assert proc.stderr.readline().strip() == "connected"


def result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def fedgate_in_control(rig: Path, *args: str, check: bool = True) -> str:
    """Run a `fedgate` command in the control netns (where etcd listens)."""
    ctl = topology.control(lifecycle.load(rig).prefix)
    res = subprocess.run(
        ["ip", "netns", "exec", ctl.netns, *rig_command().fedgate, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check:
        assert res.returncode == 0, res.stderr + res.stdout
    return res.stdout + res.stderr


def etcd(rig: Path) -> str:
    return f"{topology.control(lifecycle.load(rig).prefix).ip}:{topology.ETCD_PORT}"


def log_events(rig: Path, process: str, event: str) -> list[dict[str, Any]]:
    out = []
    for line in lifecycle.log_path(rig, process).read_text().splitlines():
        if f'"{event}"' in line and line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == event:
                out.append(entry)
    return out


def issuer_id(pem: str, roots: dict[str, x509.Certificate]) -> str:
    leaf = x509.load_pem_x509_certificates(pem.encode())[0]
    return next(rid for rid, r in roots.items() if r.subject == leaf.issuer)


# --- tests ---------------------------------------------------------------------------------------


def test_long_lived_connection_flows_while_every_certificate_renews(idrig: Path) -> None:
    """One connection held while every certificate on its path renews 3 times and outlives
    the SVIDs it was opened with; the hold ends once both were seen (at most 42 s)."""
    watched = ["east-client-sidecar", "west-redis-sidecar", "east-gateway", "west-gateway"]
    before = {p: len(log_events(idrig, p, "identity renewed")) for p in watched}

    def renewals() -> dict[str, int]:
        return {p: len(log_events(idrig, p, "identity renewed")) - before[p] for p in watched}

    longest = 42
    proc = start_client(idrig, "east/client", "hold", REDIS, "6379", str(longest))
    try:
        wait_connected(proc, 15)
        connected = time.monotonic()
        until_sync(
            renewals,
            longest,
            what="3 renewals of every certificate on the path",
            interval=0.5,
            check=lambda n: all(x >= 3 for x in n.values()),
        )
        # Past the lifetime of the SVIDs the connection was opened with, and a few pings on.
        time.sleep(max(2.0, connected + SVID_TTL + 2 - time.monotonic()))
    finally:
        proc.terminate()  # the client stops and reports
    out = result(proc, 30)
    held = out["held_s"]
    assert out["error"] is None, out
    assert held > SVID_TTL, out
    assert out["pings"] >= held * 3, out  # ~5/s when healthy
    assert out["new_failed"] == [], out
    assert out["new_ok"] >= held // 2 - 2, out
    assert all(n >= 3 for n in renewals().values()), renewals()
    for p in watched:
        assert {e["via"] for e in log_events(idrig, p, "identity renewed")} == {"svid"}, p


def test_root_rotation_under_continuous_traffic_fails_no_request(idrig: Path) -> None:
    ca_dir = bringup.ca_dir(idrig, "west")
    old = x509.load_pem_x509_certificate((ca_dir / "root.pem").read_bytes())
    traffic = start_client(idrig, "east/client", "calls", "120", ECHO, f"redis://{REDIS}:6379")
    try:
        out = fedgate_in_control(
            idrig,
            "ca",
            "rotate",
            "--cluster",
            "west",
            "--rig-dir",
            str(idrig),
            "--etcd",
            etcd(idrig),
            "--settle",
            "3s",
            "--grace",
            "3s",
        )
        assert "step 2" in out, out
        new = x509.load_pem_x509_certificate((ca_dir / "root.pem").read_bytes())
        roots = {root_id(old): old, root_id(new): new}
        assert root_id(new) != root_id(old)
        west_ns = cluster_netns(idrig, "west")

        def west_bundle() -> set[str]:
            cfg = bringup.sidecar_config(idrig, "east", "client")
            snap: Any = cfg["snapshot"]
            pems = snap["trustBundle"]["west.fedgate.local"]
            return {root_id(x509.load_pem_x509_certificate(p.encode())) for p in pems}

        # Every west workload and the gateway move to the new root at their next renewal ...
        def all_on_new_root() -> bool:
            pems = [
                admin(pod_netns(idrig, f"west/{p}"), topology.SIDECAR_ADMIN_PORT)["identityPem"]
                for p in ("echo-1", "redis", "client")
            ]
            pems.append(admin(west_ns, topology.GATEWAY_ADMIN_PORT)["identityPem"])
            return {issuer_id(p, roots) for p in pems} == {root_id(new)}

        until_sync(
            all_on_new_root,
            SVID_TTL + 10,
            what="west identities issued by the new root",
            interval=0.25,
        )
        assert west_bundle() == {root_id(old), root_id(new)}  # both trusted meanwhile
        # ... and the old root leaves every bundle after the longest lifetime + grace.
        until_sync(
            lambda: west_bundle() == {root_id(new)},
            SVID_TTL + 20,
            what="old root retired",
            interval=0.25,
        )
        ca_status = admin(west_ns, topology.AGENT_ADMIN_PORT)["ca"]
        assert ca_status["activeRoot"] == root_id(new)
        time.sleep(2)  # calls keep flowing after the retirement push
    finally:
        traffic.terminate()  # the client stops and reports
    calls = result(traffic, 30)
    assert calls["failed"] == [], calls
    assert all(n > 20 for n in calls["ok"].values()), calls


def test_a_denied_identity_is_refused_everywhere_within_one_push(idrig: Path) -> None:
    hold = start_client(idrig, "east/client", "hold", REDIS, "6379", "40")
    wait_connected(hold, 10)
    refused_before = len(log_events(idrig, "west-redis-sidecar", "inbound refused"))
    denied_at = time.monotonic()
    fedgate_in_control(idrig, "ca", "deny", "--etcd", etcd(idrig), "--identity", EAST_CLIENT)
    try:
        # The established connection is closed by the destination sidecar ...
        out = result(hold, 60)
        assert out["error"] is not None, out
        assert out["failed_after_s"] < 2 + 10, out
        closed = log_events(idrig, "west-redis-sidecar", "inbound connection closed")
        assert closed, "west redis sidecar did not close the denied caller's connection"
        assert closed[-1]["reason"] == "denied"
        took = time.monotonic() - denied_at
        # ... new calls are refused by every destination, with the reason logged ...
        probe = start_client(idrig, "east/client", "calls", "3", ECHO, f"redis://{REDIS}:6379")
        calls = result(probe, 30)
        assert sum(calls["ok"].values()) == 0, calls
        refused = log_events(idrig, "west-redis-sidecar", "inbound refused")[refused_before:]
        assert any(e["reason"] == "denied" for e in refused), refused
        assert any(
            e.get("reason") == "denied"
            for e in log_events(idrig, "east-echo-1-sidecar", "inbound refused")
        )
        # ... and the CA refuses to renew it (its SVID runs out: revocation, not only routing).
        until_sync(
            lambda: any(
                "PERMISSION_DENIED" in str(e.get("error"))
                for e in log_events(idrig, "east-client-sidecar", "identity renewal failed")
            ),
            SVID_TTL,
            what="renewal refused",
            interval=0.25,
        )
        assert any(
            "deny list" in str(e.get("reason"))
            for e in log_events(idrig, "east-agent", "sign refused")
        )
        assert took < 12, f"denial took {took:.1f} s to close the connection"
    finally:
        fedgate_in_control(idrig, "ca", "allow", "--etcd", etcd(idrig), "--identity", EAST_CLIENT)

    # Allowed again: calls flow (the client's SVID is renewed at its next retry).
    def flows() -> bool:
        probe = start_client(idrig, "east/client", "calls", "1", f"redis://{REDIS}:6379")
        return sum(result(probe, 30)["ok"].values()) > 0

    until_sync(flows, 45, what="calls after allow", interval=0.25)


def test_cli_inspect_reads_a_running_sidecar(idrig: Path) -> None:
    ns = pod_netns(idrig, "east/client")
    res = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            *rig_command().fedgate,
            "ca",
            "inspect",
            "--json",
            "--admin",
            f"127.0.0.1:{topology.SIDECAR_ADMIN_PORT}",
            "--roots",
            str(bringup.ca_dir(idrig, "east")),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["verified"] == EAST_CLIENT
    leaf = out["chain"][0]
    assert leaf["uris"] == [EAST_CLIENT]
    assert 0 < leaf["secondsLeft"] <= SVID_TTL
    assert os.path.exists(bringup.ca_dir(idrig, "east") / "ca.json")
