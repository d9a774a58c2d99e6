"""The rig's namespaces with real traffic: pods reach their cluster and the control plane, never
another cluster's pods; cleanup sweeps everything by prefix. Needs root and `ip netns`.

Every client runs inside a rig namespace (`ip netns exec`); nothing is sent from the root
namespace. The fixture sweeps the test prefix before (a previous run may have crashed) and after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusters import source
from clusters.rig import lifecycle, netns, procs
from clusters.rig import state as rigstate
from clusters.rig.cmd import run, run_in
from clusters.rig.errors import CommandError, RigError, WaitTimeoutError

PREFIX = "fgt"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "iptables", "sysctl", "curl"):
        if shutil.which(tool) is None:
            return f"needs {tool!r} on PATH"
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return f"`ip netns` is unavailable: {e}"
    return None


_REASON = _skip_reason()
pytestmark = [
    pytest.mark.rig,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]


def _ours() -> list[str]:
    return [n for n in netns.list_netns() if n.startswith(f"{PREFIX}-")]


def _root_links() -> set[str]:
    return {line.split(":")[1].strip() for line in run(["ip", "-o", "link"]).splitlines()}


@pytest.fixture
def prefix() -> Iterator[str]:
    netns.delete_all(PREFIX)  # a crashed earlier run may have left some behind
    links_before = _root_links()
    try:
        yield PREFIX
    finally:
        netns.delete_all(PREFIX)
        assert _ours() == []
        # veths are made between rig namespaces: nothing ever shows up in the root namespace
        assert _root_links() == links_before


def _listen(name: str, ns: str, host: str, port: int, log: Path) -> int:
    """An HTTP server (a plain TCP listener for connect checks) inside `ns`."""
    argv = [sys.executable, "-u", "-m", "http.server", "--bind", host, str(port)]
    pid = procs.start(name, ns, argv, log)
    procs.wait_tcp(ns, host, port, 10, log_path=log, pid=pid)
    return pid


def test_pods_reach_their_cluster_and_control_but_not_other_clusters(
    prefix: str, tmp_path: Path
) -> None:
    wan = netns.create_wan(prefix)
    ctl = netns.create_control(prefix)
    east = netns.create_cluster(prefix, 0)
    west = netns.create_cluster(prefix, 1)
    a = netns.create_pod(prefix, 0, 0, "a")
    b = netns.create_pod(prefix, 0, 1, "b")
    c = netns.create_pod(prefix, 1, 0, "c")
    assert (a.ip, b.ip, c.ip) == ("10.1.0.10", "10.1.0.11", "10.2.0.10")
    assert sorted(_ours()) == sorted(
        [wan, ctl.netns, east.netns, west.netns, a.netns, b.netns, c.netns]
    )

    # The pod's view: its own address on eth0, a default route via the cluster, DNS at the
    # sidecar (`ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf).
    assert "10.1.0.10/24" in run_in(a.netns, ["ip", "-o", "addr", "show", "dev", "eth0"])
    assert "default via 10.1.0.1" in run_in(a.netns, ["ip", "route"])
    assert run_in(a.netns, ["cat", "/etc/resolv.conf"]) == "nameserver 127.0.0.1\n"
    assert run_in(east.netns, ["sysctl", "-n", "net.ipv4.ip_forward"]).strip() == "1"

    # Pod -> its cluster's gateway address.
    _listen("east-gw", east.netns, east.pod_gateway, 18081, tmp_path / "east-gw.log")
    procs.wait_tcp(a.netns, east.pod_gateway, 18081, 5)

    # Pod -> control plane over the WAN, masqueraded as the cluster's WAN address.
    ctl_log = tmp_path / "ctl.log"
    _listen("ctl-http", ctl.netns, ctl.ip, 18080, ctl_log)
    procs.wait_http_ok(a.netns, f"http://{ctl.ip}:18080/", 5, log_path=ctl_log)
    assert f"{east.wan_ip} - - " in ctl_log.read_text()
    assert a.ip not in ctl_log.read_text()

    # Pod -> pod in the same cluster, across the pods0 bridge.
    _listen("east-b", b.netns, b.ip, 18082, tmp_path / "b.log")
    procs.wait_tcp(a.netns, b.ip, 18082, 5)

    # Pod -> pod in another cluster: reachable from its own cluster, never from east.
    _listen("west-c", c.netns, c.ip, 18083, tmp_path / "c.log")
    procs.wait_tcp(west.netns, c.ip, 18083, 5)
    with pytest.raises(WaitTimeoutError, match=r"TCP 10\.2\.0\.10:18083 in netns fgt-east-a"):
        procs.wait_tcp(a.netns, c.ip, 18083, 1.0)
    with pytest.raises(CommandError):
        run_in(
            a.netns, ["curl", "-sf", "--noproxy", "*", "--max-time", "1", f"http://{c.ip}:18083/"]
        )
    with pytest.raises(WaitTimeoutError):
        procs.wait_tcp(east.netns, c.ip, 18083, 0.5)

    pids = [pid for ns in _ours() for pid in netns.pids(ns)]
    assert len(pids) == 4
    removed = netns.delete_all(prefix)
    assert sorted(removed) == sorted(
        [wan, ctl.netns, east.netns, west.netns, a.netns, b.netns, c.netns]
    )
    assert _ours() == []
    assert not any(procs.alive(pid) for pid in pids)
    assert not list(netns.ETC_NETNS.glob(f"{prefix}-*"))
    assert netns.delete_all(prefix) == []  # idempotent


def test_wait_timeout_names_the_target_and_tails_the_log(prefix: str, tmp_path: Path) -> None:
    netns.create_wan(prefix)
    ctl = netns.create_control(prefix)
    log = tmp_path / "svc.log"
    log.write_text("".join(f"line {i}\n" for i in range(30)))
    with pytest.raises(WaitTimeoutError) as info:
        procs.wait_http_ok(ctl.netns, f"http://{ctl.ip}:18099/healthz", 0.5, log_path=log)
    text = str(info.value)
    assert f"HTTP 2xx from http://{ctl.ip}:18099/healthz in netns {ctl.netns}" in text
    assert "line 29" in text
    assert "line 10" in text
    assert "line 9\n" not in text  # only the last 20 lines

    # A process that dies while being waited for fails fast, with its own log.
    dead_log = tmp_path / "dead.log"
    pid = procs.start(
        "dies", ctl.netns, [sys.executable, "-c", "raise SystemExit('boom')"], dead_log
    )
    with pytest.raises(WaitTimeoutError, match=r"(?s)process \d+ exited.*boom"):
        procs.wait_tcp(ctl.netns, ctl.ip, 18098, 30, log_path=dead_log, pid=pid)


def test_delete_all_kills_processes_that_ignore_sigterm(prefix: str, tmp_path: Path) -> None:
    netns.create_wan(prefix)
    ctl = netns.create_control(prefix)
    # The listener opens only after the handler is installed, so waiting for it means
    # SIGTERM will be ignored.
    stubborn = (
        "import signal, socket, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "s = socket.socket()\n"
        "s.bind((sys.argv[1], 18097))\n"
        "s.listen()\n"
        "time.sleep(60)\n"
    )
    log = tmp_path / "stubborn.log"
    pid = procs.start("stubborn", ctl.netns, [sys.executable, "-c", stubborn, ctl.ip], log)
    procs.wait_tcp(ctl.netns, ctl.ip, 18097, 10, log_path=log, pid=pid)
    assert netns.pids(ctl.netns) == [pid]
    netns.delete_all(prefix, timeout=0.5)
    assert not procs.alive(pid)
    assert _ours() == []


def test_start_refuses_a_missing_netns(tmp_path: Path) -> None:
    with pytest.raises(RigError, match="netns 'fgt-nowhere' does not exist"):
        procs.start("x", "fgt-nowhere", ["true"], tmp_path / "x.log")


def test_lifecycle(prefix: str, tmp_path: Path) -> None:
    rigdir = tmp_path / "rig"
    st = lifecycle.up(rigdir, 2, prefix)
    assert [c.name for c in st.clusters] == ["east", "west"]
    assert source.read_exports(source.exports_path(rigdir, "east")) == ()
    assert source.read_tokens(source.tokens_path(rigdir, "west")) == {}
    with pytest.raises(RigError, match="already exists"):
        lifecycle.up(rigdir, 2, prefix)

    a = lifecycle.add_pod(rigdir, "east", "a", "shop", "payments")
    b = lifecycle.add_pod(rigdir, "east", "b")
    assert (a.ip, b.ip, a.service_account, b.namespace) == (
        "10.1.0.10",
        "10.1.0.11",
        "payments",
        "default",
    )
    path = source.exports_path(rigdir, "east")
    source.add_export(path, "shop", "payments", [], created=1.0)
    source.add_endpoint(path, "shop", "payments", "a", a.ip, "payments")

    server = lifecycle.start_process(
        rigdir,
        "a-http",
        a.netns,
        [sys.executable, "-u", "-m", "http.server", "--bind", a.ip, "18084"],
        env={"FEDGATE_TEST": "1"},
    )
    assert server.log_path == str(rigdir / "logs" / "a-http.log")
    assert server.start_ticks == procs.start_ticks(server.pid)
    procs.wait_http_ok(b.netns, f"http://{a.ip}:18084/", 10, log_path=Path(server.log_path))

    # Removing a pod stops its processes, drops its endpoints, and its address is never reused.
    lifecycle.remove_pod(rigdir, "east", "a")
    assert not procs.alive(server.pid)
    assert source.read_exports(path)[0].endpoints == ()
    assert not netns.exists(a.netns)
    again = lifecycle.add_pod(rigdir, "east", "a")
    assert again.ip == "10.1.0.12"
    assert lifecycle.load(rigdir).processes == ()

    sleeper = lifecycle.start_process(rigdir, "sleeper", again.netns, ["sleep", "60"])
    assert lifecycle.stop_process(rigdir, "sleeper") is True
    assert not procs.alive(sleeper.pid)
    lifecycle.start_process(rigdir, "sleeper", again.netns, ["sleep", "60"])

    removed = lifecycle.down(rigdir)
    assert len(removed) == 6  # wan, ctl, east, west, b, a
    assert not rigstate.state_file(rigdir).exists()
    assert _ours() == []
    assert lifecycle.down(rigdir, prefix) == []  # no state, nothing left: still fine


def test_down_after_a_crash_sweeps_without_state(prefix: str, tmp_path: Path) -> None:
    rigdir = tmp_path / "rig"
    lifecycle.up(rigdir, 1, prefix)
    lifecycle.add_pod(rigdir, "east", "a")
    rigstate.state_file(rigdir).write_text("garbage")  # a crash mid-write, say
    assert sorted(lifecycle.down(rigdir, prefix)) == [
        "fgt-ctl",
        "fgt-east",
        "fgt-east-a",
        "fgt-wan",
    ]
    with pytest.raises(RigError, match="no rig"):
        lifecycle.load(rigdir)
