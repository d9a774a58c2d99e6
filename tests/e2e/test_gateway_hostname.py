"""A gateway published under a DNS name whose address changes under load (issue 16).

West's agent publishes its gateway as `west-gw.fedgate.test:<tunnel port>`, as a cloud load
balancer's `status.loadBalancer.ingress[].hostname` would be. East's processes resolve that
name through their own hosts file (`/etc/netns/<east netns>/hosts`, bind-mounted over
/etc/hosts by `ip netns exec`, read by the system resolver at every lookup). West answers on a
second WAN address too (`NEW_IP`, forwarded to its gateway by a DNAT rule in west's namespace:
the load balancer's front changed, the gateway behind it did not). While two bounded curl loops
in east/client call a west-only service, the name is moved to the second address: no call
fails, east's gateway follows the name within its refresh interval, and a call opening a new
tunnel stream reaches west through the new address (the DNAT rule counts its connection).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clusters.rig import cmd, control, lifecycle, procs, topology
from clusters.rig import state as rigstate
from clusters.rig.state import ClusterRecord
from mesh.model import ServicePort
from tests.e2e import policy_rig
from tests.e2e.conftest import rig_command
from tests.helpers import until_sync

pytestmark = pytest.mark.rig

NAME = "west-gw.fedgate.test"
NEW_IP = "172.30.0.200"  # outside the rig's cluster addresses (172.30.0.10+i)
PORT = 8080
MAX_CALLS = 3000  # per loop (two loops), a bound: the test stops them once it has seen enough
AFTER = 40  # calls the loops must make after the change is noticed
REFRESH_WITHIN = 20.0  # the gateway re-resolves every 5 s; slack for this busy machine
DNAT = ["PREROUTING", "-d", NEW_IP, "-j", "DNAT", "-m", "comment", "--comment", "fgd-hostname"]


@dataclass(frozen=True)
class Setup:
    rig: Path
    east: ClusterRecord
    west: ClusterRecord
    hosts: Path


def _url(service: str) -> str:
    return f"http://{service}.demo.svc.clusterset.local:{PORT}/"


def _hosts(s: Setup, address: str) -> None:
    # Written in place (same inode): the bind mount over east's /etc/hosts follows it.
    s.hosts.write_text(f"127.0.0.1 localhost\n::1 localhost\n{address} {NAME}\n")


def _cluster(rig: Path, name: str) -> ClusterRecord:
    record = lifecycle.load(rig).cluster(name)
    assert record is not None
    return record


def _restart(rig: Path, name: str, argv: list[str]) -> None:
    """Start the rig process `name` again with `argv` (control.restart keeps its argv)."""
    record = lifecycle.load(rig).process(name)
    assert record is not None
    procs.stop(record.pid, state_file=rigstate.state_file(rig))
    lifecycle.start_process(rig, name, record.netns, argv)


def _gateway_ready(s: Setup) -> None:
    url = f"http://127.0.0.1:{topology.GATEWAY_ADMIN_PORT}/readyz"
    procs.wait_http_ok(s.east.netns, url, 30.0)


def _east_gateway_config(s: Setup) -> dict[str, Any]:
    url = f"http://127.0.0.1:{topology.GATEWAY_ADMIN_PORT}/config"
    got = json.loads(cmd.run_in(s.east.netns, ["curl", "-sS", "--max-time", "5", url]))
    assert isinstance(got, dict)
    return got


def _west_addresses(config: dict[str, Any]) -> set[str]:
    """Every `address` east's gateway reports for its links to west (pool status)."""
    found: set[str] = set()

    def walk(node: object, under_west: bool) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "address" and under_west and isinstance(value, str):
                    found.add(value)
                walk(value, under_west or key == "west")
        elif isinstance(node, list):
            for item in node:
                walk(item, under_west)

    walk(config, False)
    return found


def _published(s: Setup) -> str:
    """West's gateway tunnel host as east's gateway has it in its snapshot."""
    for c in _east_gateway_config(s)["snapshot"]["clusters"]:
        if c["name"] == "west" and c.get("gateway"):
            return str(c["gateway"]["tunnelHost"])
    return ""


def _address_changes(s: Setup) -> list[tuple[str, str]]:
    """(old, new) of each `peer gateway address changed` line east's gateway logged for NAME."""
    out = []
    for line in lifecycle.log_path(s.rig, "east-gateway").read_text().splitlines():
        if "peer gateway address changed" in line and NAME in line:
            event = json.loads(line)
            out.append((event["old"], event["new"]))
    return out


def _dnat_packets(s: Setup) -> int:
    """Connections the DNAT rule forwarded (the nat table sees a connection's first packet)."""
    out = cmd.run_in(s.west.netns, ["iptables", "-t", "nat", "-L", "PREROUTING", "-v", "-n", "-x"])
    for line in out.splitlines():
        if "fgd-hostname" in line:
            return int(line.split()[0])
    raise AssertionError(f"DNAT rule missing:\n{out}")


@pytest.fixture(scope="module")
def named(rig: Path) -> Iterator[Setup]:
    fedgate = rig_command().fedgate

    def workload(cluster: str, pod: str) -> list[str]:
        return [*fedgate, "echo", "--cluster", cluster, "--pod", pod, "--port", str(PORT)]

    ports = [ServicePort("http", PORT, "HTTP")]
    policy_rig.start_workload(rig, "named", (("west", "named-1", "v1"),), workload, ports)
    policy_rig.start_workload(rig, "named2", (("west", "named2-1", "v1"),), workload, ports)
    east, west = _cluster(rig, "east"), _cluster(rig, "west")
    s = Setup(rig, east, west, Path("/etc/netns") / east.netns / "hosts")
    agent = lifecycle.load(rig).process("west-agent")
    assert agent is not None
    original = list(agent.argv)
    tunnel = original[original.index("--gateway-tunnel") + 1]
    host, port = tunnel.rsplit(":", 1)
    assert host == west.wan_ip
    cmd.run_in(west.netns, ["ip", "addr", "add", f"{NEW_IP}/24", "dev", topology.WAN_INTERFACE])
    cmd.run_in(west.netns, ["iptables", "-t", "nat", "-A", *DNAT, "--to-destination", host])
    made = not s.hosts.parent.exists()
    s.hosts.parent.mkdir(parents=True, exist_ok=True)
    try:
        _hosts(s, west.wan_ip)
        # East's gateway must start after its hosts file exists (`ip netns exec` mounts it).
        control.restart(rig, "east-gateway")
        _gateway_ready(s)
        named_argv = [*original]
        named_argv[original.index("--gateway-tunnel") + 1] = f"{NAME}:{port}"
        _restart(rig, "west-agent", named_argv)
        until_sync(lambda: _published(s), 30.0, check=lambda h: h == NAME, what="west by name")
        yield s
    finally:
        _restart(rig, "west-agent", original)
        until_sync(lambda: _published(s), 30.0, check=lambda h: h == host, what="west by IP")
        s.hosts.unlink(missing_ok=True)
        if made:
            s.hosts.parent.rmdir()
        control.restart(rig, "east-gateway")
        _gateway_ready(s)
        cmd.run_in(west.netns, ["iptables", "-t", "nat", "-D", *DNAT, "--to-destination", host])
        cmd.run_in(west.netns, ["ip", "addr", "del", f"{NEW_IP}/24", "dev", topology.WAN_INTERFACE])


def _loop(s: Setup, out: Path, stop: Path) -> subprocess.Popen[bytes]:
    """Sequential calls until `stop` exists (at most MAX_CALLS), one status per line."""
    one = f"curl -s --noproxy '*' --max-time 10 -o /dev/null -w '%{{http_code}}\\n' {_url('named')}"
    script = (
        f"i=0; while [ ! -e {stop} ] && [ $i -lt {MAX_CALLS} ]; do {one}; i=$((i+1)); done > {out}"
    )
    netns = policy_rig.pod_netns(s.rig, "east", "client")
    return subprocess.Popen(["ip", "netns", "exec", netns, "sh", "-c", script])


def _codes(out: Path) -> list[str]:
    return out.read_text().split() if out.exists() else []


def test_a_gateway_name_moving_to_a_new_address_drops_no_call(named: Setup, tmp_path: Path) -> None:
    s = named
    before = policy_rig.run_in_pod(s.rig, "east", "client", ["curl", "-sS", _url("named")], 15)
    assert before  # the echo answered through the tunnel dialled by name
    assert _west_addresses(_east_gateway_config(s)) == {f"{s.west.wan_ip}:{topology.TUNNEL_PORT}"}
    dnat_before = _dnat_packets(s)
    outs = [tmp_path / "loop-1", tmp_path / "loop-2"]
    stop = tmp_path / "stop"
    loops = [_loop(s, out, stop) for out in outs]

    def made() -> int:
        return sum(len(_codes(o)) for o in outs)

    try:
        until_sync(made, 60.0, check=lambda n: n >= 40, what="load before the change")
        _hosts(s, NEW_IP)  # the load balancer's address changes under load
        until_sync(
            lambda: _address_changes(s),
            REFRESH_WITHIN,
            check=lambda changes: changes == [(s.west.wan_ip, NEW_IP)],
            what="east's gateway re-resolves west's name",
        )
        noticed = made()
        assert all(loop.poll() is None for loop in loops)  # still under load
        # A call that needs a new tunnel stream (a service not called before) goes there.
        fresh = policy_rig.run_in_pod(s.rig, "east", "client", ["curl", "-sS", _url("named2")], 15)
        assert fresh
        assert _dnat_packets(s) > dnat_before
        new = f"{NEW_IP}:{topology.TUNNEL_PORT}"
        assert _west_addresses(_east_gateway_config(s)) == {new}
        until_sync(made, 60.0, check=lambda n: n >= noticed + AFTER, what="load after it")
    finally:
        stop.touch()
        for loop in loops:
            loop.wait(timeout=60)
    codes = [c for o in outs for c in _codes(o)]
    assert len(codes) >= noticed + AFTER
    assert set(codes) == {"200"}, {c: codes.count(c) for c in set(codes)}
