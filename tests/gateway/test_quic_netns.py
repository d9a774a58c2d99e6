"""The QUIC tunnel on a real link: two network namespaces joined by a veth pair, each gateway a
real process (`quic_netns_helper.py`) started with `ip netns exec`.

* Migration: the east gateway's address changes (10.77.0.2 -> 10.77.0.3, the old one deleted)
  while a stream carries a ping-pong; every message comes back, east logs "tunnel migrated"
  and counts it, west sees the new address.
* Datagram size from the path MTU: with configured 8,952-byte datagrams, a 1,500-byte link gives
  1,472 on both sides (the server learns it from the client's `max_udp_payload_size`); a
  9,000-byte link gives 8,952, and a bulk transfer crosses intact (the socket forbids
  fragmentation, so oversize datagrams could not pass silently).

Needs root and `ip netns`; namespaces are named `fgq-<pid>-a/b` and removed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ca.authority import CertificateAuthority
from mesh.codec import dumps, snapshot_to_json
from mesh.model import ClusterInfo, Endpoint, GatewayAddress, MergedService, ServicePort, Snapshot
from mesh.naming import SpiffeId
from tests.gateway.conftest import ECHO, gateway_svid
from tests.helpers import until_sync

REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("quic_netns_helper.py")
TAG = f"fgq-{os.getpid()}"
EAST_NS, WEST_NS = f"{TAG}-a", f"{TAG}-b"
EAST_IP, EAST_NEW_IP, WEST_IP = "10.77.0.2", "10.77.0.3", "10.77.0.1"
TUNNEL_PORT, EGRESS_PORT, ECHO_PORT = 15443, 15008, 7070  # the helper's fixed ports
JUMBO = 8952


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


def _delete_namespaces() -> None:
    for ns in (EAST_NS, WEST_NS):
        _ip("netns", "del", ns, check=False)


class Proc:
    """One helper process; commands on stdin, one JSON line back."""

    def __init__(self, ns: str, role: str, config: Path, log: Path) -> None:
        self.log = log
        with log.open("w") as stderr:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, str(HELPER), role, str(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        assert self._line(20) == "ready", log.read_text()[-2000:]

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no answer within {timeout}s; log: {self.log.read_text()[-2000:]}"
        return self.proc.stdout.readline().strip()

    def ask(self, command: str, timeout: float = 20) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self._line(timeout)
        assert line, f"{command}: the helper exited; log: {self.log.read_text()[-2000:]}"
        return json.loads(line)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):  # not a structlog line
                out.append(json.loads(line))
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def link() -> Iterator[None]:
    """Two namespaces joined by a veth: east 10.77.0.2/24 (fgq0), west 10.77.0.1/24 (fgq1)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2")
    _delete_namespaces()
    if _ip("netns", "add", EAST_NS, check=False).returncode != 0:
        pytest.skip("ip netns is not available here")
    try:
        _ip("netns", "add", WEST_NS)
        for ns in (EAST_NS, WEST_NS):
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", EAST_NS, "link", "add", "fgq0", "type", "veth", "peer", "name", "fgq1")
        _ip("-n", EAST_NS, "link", "set", "fgq1", "netns", WEST_NS)
        # Deleting the primary address must keep the secondary one (the new address).
        subprocess.run(
            ["ip", "netns", "exec", EAST_NS, "sysctl", "-qw",
             "net.ipv4.conf.fgq0.promote_secondaries=1"],
            check=True, timeout=10,
        )  # fmt: skip
        _ip("-n", EAST_NS, "addr", "add", f"{EAST_IP}/24", "dev", "fgq0")
        _ip("-n", WEST_NS, "addr", "add", f"{WEST_IP}/24", "dev", "fgq1")
        _ip("-n", EAST_NS, "link", "set", "fgq0", "up")
        _ip("-n", WEST_NS, "link", "set", "fgq1", "up")
        yield
    finally:
        _delete_namespaces()


def _snapshot(east_ca: CertificateAuthority, west_ca: CertificateAuthority) -> Snapshot:
    def info(name: str, ip: str, ca: CertificateAuthority) -> ClusterInfo:
        return ClusterInfo(
            name=name,
            trust_domain=ca.trust_domain,
            gateway=GatewayAddress(ip, TUNNEL_PORT, "127.0.0.1", EGRESS_PORT, "quic"),
            roots=(ca.root_pem.decode(),),
        )

    echo_id = SpiffeId(west_ca.trust_domain, "demo", "echo")
    return Snapshot(
        version="v1",
        clusters=(info("east", EAST_IP, east_ca), info("west", WEST_IP, west_ca)),
        services=(
            MergedService(
                key=ECHO,
                vip="240.0.0.10",
                ports=(ServicePort("tcp", ECHO_PORT),),
                clusters=("west",),
                endpoints=(Endpoint("west", "127.0.0.1", "echo-west", echo_id),),
            ),
        ),
        trust_bundle={
            east_ca.trust_domain: (east_ca.root_pem.decode(),),
            west_ca.trust_domain: (west_ca.root_pem.decode(),),
        },
    )


def start(
    tmp_path: Path,
    east_ca: CertificateAuthority,
    west_ca: CertificateAuthority,
    max_datagram_size: int = JUMBO,
) -> tuple[Proc, Proc]:
    snapshot = dumps(snapshot_to_json(_snapshot(east_ca, west_ca))).decode()
    procs: dict[str, Proc] = {}
    for name, ns, ca in (("west", WEST_NS, west_ca), ("east", EAST_NS, east_ca)):
        svid = gateway_svid(ca)
        config = tmp_path / f"{name}.json"
        config.write_text(
            json.dumps(
                {
                    "cluster": name,
                    "trust_domain": ca.trust_domain,
                    "cert": svid.cert_pem.decode(),
                    "key": svid.key_pem.decode(),
                    "anchor": ca.root_pem.decode(),
                    "snapshot": snapshot,
                    "max_datagram_size": max_datagram_size,
                }
            )
        )
        procs[name] = Proc(ns, name, config, tmp_path / f"{name}.log")
    return procs["east"], procs["west"]


@pytest.fixture
def gateways(
    link: None, tmp_path: Path, east_ca: CertificateAuthority, west_ca: CertificateAuthority
) -> Iterator[Callable[[int], tuple[Proc, Proc]]]:
    started: list[Proc] = []

    def run(max_datagram_size: int = JUMBO) -> tuple[Proc, Proc]:
        east, west = start(tmp_path, east_ca, west_ca, max_datagram_size)
        started.extend((east, west))
        return east, west

    try:
        yield run
    finally:
        for proc in started:
            proc.kill()


def _west_peer(west: Proc) -> dict[str, Any]:
    inbound = west.ask("status")["gateway"]["inbound"]
    return inbound[0] if inbound else {}


def _east_peer(status: dict[str, Any]) -> dict[str, Any]:
    peer: dict[str, Any] = status["gateway"]["outbound"]["quic"]["peers"].get("west", {})
    return peer


def test_address_change_migrates_the_tunnel_and_loses_nothing(
    gateways: Callable[[int], tuple[Proc, Proc]],
) -> None:
    east, west = gateways(JUMBO)
    before = until_sync(
        lambda: east.ask("status"), 20, check=lambda s: s["pings"] >= 50, what="ping-pong running"
    )
    assert not before["errors"]
    assert _east_peer(before)["local_address"].startswith(f"{EAST_IP}:")
    assert _west_peer(west)["peer_address"].startswith(f"{EAST_IP}:")

    # The gateway's address changes under the running stream.
    _ip("-n", EAST_NS, "addr", "add", f"{EAST_NEW_IP}/24", "dev", "fgq0")
    _ip("-n", EAST_NS, "addr", "del", f"{EAST_IP}/24", "dev", "fgq0")
    moved = until_sync(
        lambda: east.ask("status"),
        20,
        check=lambda s: (
            _east_peer(s).get("migrations") == 1 and s["pings"] >= before["pings"] + 200
        ),
        what="migration and 200 more pings",
    )
    assert not moved["errors"], moved["errors"]
    peer = _east_peer(moved)
    assert peer["state"] == "connected"
    assert peer["connections"] == 1  # the same connection, not a reconnect
    assert moved["gateway"]["outbound"]["quic"]["connects"] == 1
    assert peer["local_address"].startswith(f"{EAST_NEW_IP}:")
    seen = until_sync(
        lambda: _west_peer(west),
        10,
        check=lambda p: p.get("peer_address", "").startswith(f"{EAST_NEW_IP}:"),
        what="west sees the new address",
    )
    assert seen["streams_total"] == 1  # still the ping-pong's stream

    final = east.ask("stop")
    assert final["errors"] == []
    assert final["pings"] >= moved["pings"]
    migrated = [e for e in east.events() if e.get("event") == "tunnel migrated"]
    assert len(migrated) == 1, migrated
    assert migrated[0]["old_local"].startswith(f"{EAST_IP}:")
    assert migrated[0]["new_local"].startswith(f"{EAST_NEW_IP}:")
    assert "unreachable" in migrated[0]["trigger"]


@pytest.mark.parametrize(("mtu", "expected"), [(1500, 1472), (9000, JUMBO)])
def test_datagram_size_follows_the_path_mtu(
    gateways: Callable[[int], tuple[Proc, Proc]], mtu: int, expected: int
) -> None:
    _ip("-n", EAST_NS, "link", "set", "fgq0", "mtu", str(mtu))
    _ip("-n", WEST_NS, "link", "set", "fgq1", "mtu", str(mtu))
    east, west = gateways(JUMBO)
    status = until_sync(
        lambda: east.ask("status"),
        20,
        check=lambda s: _east_peer(s).get("state") == "connected",
        what="tunnel up",
    )
    assert _east_peer(status)["max_datagram_size"] == expected
    # The server sends no more than the client advertised (transport parameter).
    assert _west_peer(west)["max_datagram_size"] == expected
    result = east.ask(f"bulk {4 * 1024 * 1024}", timeout=40)
    assert result["intact"], result
    assert not east.ask("status")["errors"]


def test_a_shrinking_path_mtu_lowers_the_datagram_size(
    gateways: Callable[[int], tuple[Proc, Proc]],
) -> None:
    for ns, dev in ((EAST_NS, "fgq0"), (WEST_NS, "fgq1")):
        _ip("-n", ns, "link", "set", dev, "mtu", "9000")
    east, _ = gateways(JUMBO)
    status = until_sync(
        lambda: east.ask("status"),
        20,
        check=lambda s: _east_peer(s).get("max_datagram_size") == JUMBO,
        what="tunnel up",
    )
    assert _east_peer(status)["state"] == "connected"
    for ns, dev in ((EAST_NS, "fgq0"), (WEST_NS, "fgq1")):
        _ip("-n", ns, "link", "set", dev, "mtu", "1500")
    # Jumbo datagrams now fail with EMSGSIZE (fragmentation is forbidden): east re-reads the
    # path MTU, and the data goes through in smaller datagrams on the same connection.
    result = east.ask(f"bulk {4 * 1024 * 1024}", timeout=40)
    assert result["intact"], result
    after = east.ask("status")
    assert _east_peer(after)["max_datagram_size"] == 1472
    assert after["gateway"]["outbound"]["quic"]["connects"] == 1
    assert not after["errors"]
    changed = [e for e in east.events() if e.get("event") == "tunnel datagram size changed"]
    assert [(e["old"], e["new"]) for e in changed] == [(JUMBO, 1472)]
