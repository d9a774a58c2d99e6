"""Capture: the generated rules, and the real thing in a throwaway network namespace.

The namespace test needs root and `ip netns`; it builds two namespaces joined by a veth pair
(pod 10.99.0.1/24, peer 10.99.0.2/24), so no packet ever reaches the host's own network.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.codec import dumps, snapshot_to_json
from sidecar.capture import CaptureConfig, capture_rules, original_dst
from sidecar.errors import CaptureError
from tests.sidecar.conftest import EAST, Pki, cluster, endpoint, snapshot, spiffe

REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("netns_helper.py")


def test_rules_capture_tcp_except_the_proxy_gid_and_loopback() -> None:
    rules = capture_rules(CaptureConfig(outbound_port=15001, inbound_port=15006, proxy_gid=1337))
    lines = rules.splitlines()
    nat = lines[lines.index("*nat") : lines.index("COMMIT") + 1]
    chain = [line for line in nat if line.startswith("-A FEDGATE_OUTPUT")]
    # Order matters: the exclusions must come before the REDIRECT.
    assert chain == [
        "-A FEDGATE_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A FEDGATE_OUTPUT -o lo -j RETURN",
        "-A FEDGATE_OUTPUT -d 127.0.0.0/8 -j RETURN",
        "-A FEDGATE_OUTPUT -p tcp --syn -j REDIRECT --to-ports 15001",
    ]
    assert "-A OUTPUT -p tcp -j FEDGATE_OUTPUT" in nat


def test_rules_admit_only_the_inbound_port() -> None:
    lines = capture_rules(CaptureConfig(inbound_port=16006)).splitlines()
    filt = lines[lines.index("*filter") :]
    assert [line for line in filt if line.startswith("-A FEDGATE_INBOUND")] == [
        "-A FEDGATE_INBOUND -i lo -j ACCEPT",
        "-A FEDGATE_INBOUND -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A FEDGATE_INBOUND -p tcp --dport 16006 -j ACCEPT",
        "-A FEDGATE_INBOUND -p tcp --syn -m conntrack --ctstate NEW -j DROP",
    ]
    assert filt[-1] == "COMMIT"


def test_config_validates_ports() -> None:
    with pytest.raises(ValueError, match="outbound_port"):
        CaptureConfig(outbound_port=0)


def test_original_dst_of_an_unredirected_socket_is_a_capture_error() -> None:
    with socket.socket() as s, pytest.raises(CaptureError, match="SO_ORIGINAL_DST"):
        original_dst(s)


# --- in a real network namespace ------------------------------------------------------------

TAG = f"fgs-t{os.getpid()}"
POD, PEER = f"{TAG}-pod", f"{TAG}-peer"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


def _delete_namespaces() -> None:
    for ns in (POD, PEER):
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


class Netns:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def _argv(self, ns: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", ns, sys.executable, str(HELPER), *args]

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO)}

    def run(self, ns: str, *args: str) -> str:
        out = subprocess.run(
            self._argv(ns, *args), capture_output=True, text=True, timeout=15, env=self._env()
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def background(self, ns: str, *args: str, log: Path | None = None) -> subprocess.Popen[str]:
        stderr = log.open("w") if log is not None else None
        proc = subprocess.Popen(
            self._argv(ns, *args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=self._env(),
        )
        if stderr is not None:
            stderr.close()  # the child holds its own descriptor
        self.procs.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, f"{args} did not start"
        assert proc.stdout.readline().strip() == "ready"
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(timeout=5)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()


@pytest.fixture
def netns() -> Iterator[Netns]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None or shutil.which("iptables-restore") is None:
        pytest.skip("needs iproute2 and iptables")
    _delete_namespaces()  # a crashed earlier run may have left them
    if _ip("netns", "add", POD, check=False).returncode != 0:
        pytest.skip("ip netns is not available here")
    n = Netns()
    try:
        _ip("netns", "add", PEER)
        _ip("-n", POD, "link", "set", "lo", "up")
        _ip("-n", PEER, "link", "set", "lo", "up")
        _ip("-n", POD, "link", "add", "fgs0", "type", "veth", "peer", "name", "fgs1", "netns", PEER)
        _ip("-n", POD, "addr", "add", "10.99.0.1/24", "dev", "fgs0")
        _ip("-n", PEER, "addr", "add", "10.99.0.2/24", "dev", "fgs1")
        _ip("-n", POD, "link", "set", "fgs0", "up")
        _ip("-n", PEER, "link", "set", "fgs1", "up")
        yield n
    finally:
        n.stop()
        _delete_namespaces()


def test_capture_in_a_network_namespace(netns: Netns) -> None:
    assert netns.run(POD, "install", "15001", "15006", "1337") == "ok"
    netns.background(PEER, "serve", "10.99.0.2", "8080", "peer")
    netns.background(POD, "capture", "15001", "1337")
    netns.background(POD, "serve", "0.0.0.0", "15006", "inbound")
    netns.background(POD, "serve", "0.0.0.0", "8081", "app")

    # An app (GID 0) calling out is redirected to the outbound port, which sees the real target.
    assert netns.run(POD, "connect", "10.99.0.2", "8080") == "orig 10.99.0.2:8080"
    # The sidecar's own GID escapes capture and reaches the peer.
    assert netns.run(POD, "connect", "10.99.0.2", "8080", "1337") == "peer"
    # Loopback traffic is never captured.
    assert netns.run(POD, "connect", "127.0.0.1", "8081") == "app"
    # From outside only the inbound port answers; the app port is dropped (connect times out).
    assert netns.run(PEER, "connect", "10.99.0.1", "15006") == "inbound"
    assert netns.run(PEER, "connect", "10.99.0.1", "8081") == "error TimeoutError"


def test_capture_leaves_connections_opened_before_it_alone(netns: Netns) -> None:
    """The sidecar opens its config stream before it installs capture. Installing the first nat
    rule starts connection tracking in the namespace, and the next packet of that stream is
    then tracked as NEW: if it comes in from the controller, a rule dropping NEW TCP would drop
    it and every retransmission (the stream stalls until keepalive gives up). Only SYNs are
    connection attempts, so only SYNs may be dropped or redirected."""
    push = netns.background(PEER, "push", "10.99.0.2", "8090")
    hold = netns.background(POD, "hold", "10.99.0.2", "8090", "1337")
    assert netns.run(POD, "install", "15001", "15006", "1337") == "ok"
    assert push.stdin is not None
    assert hold.stdout is not None
    push.stdin.write("go\n")  # the first packet after install flows inbound
    push.stdin.flush()
    ready, _, _ = select.select([hold.stdout], [], [], 10)
    assert ready, "the held connection never answered"
    assert hold.stdout.readline().strip() == "pushed"


def test_install_names_the_rejected_rule(netns: Netns) -> None:
    out = netns.run(POD, "install-bad")
    assert out.startswith("error iptables-restore rejected line")
    assert "--dport 99999" in out


def test_curl_through_captured_sidecars(netns: Netns, pki: Pki, tmp_path: Path) -> None:
    """An unmodified client resolves a clusterset name and calls it; both pods capture."""
    # glibc in the pod asks the sidecar's DNS (`ip netns exec` mounts this over /etc).
    resolv = Path("/etc/netns") / POD / "resolv.conf"
    resolv.parent.mkdir(parents=True, exist_ok=True)
    resolv.write_text("nameserver 127.0.0.1\n")
    _ip("-n", POD, "route", "add", "default", "dev", "fgs0")  # VIPs must route before NAT
    snap = snapshot(
        clusters=(cluster("east", None),),
        endpoints=(endpoint("east", "10.99.0.2", "payments-0"),),
        vip="10.96.0.10",
        port=8080,
        trust_bundle={EAST: (pki.east.root_pem.decode(),)},
    )
    snap_json = dumps(snapshot_to_json(snap)).decode()
    for pod, sa in (("client-0", "client"), ("payments-0", "payments")):
        svid = pki.svid(pki.east, spiffe(EAST, sa))
        config = {
            "cluster": "east",
            "pod": pod,
            "cert": svid.cert_pem.decode(),
            "key": svid.key_pem.decode(),
            "anchor": pki.east.root_pem.decode(),
            "snapshot": snap_json,
        }
        (tmp_path / f"{pod}.json").write_text(json.dumps(config))
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello").write_text("hello from payments-0\n")

    netns.background(PEER, "http", str(www), log=tmp_path / "http.log")
    netns.background(PEER, "sidecar", str(tmp_path / "payments-0.json"), log=tmp_path / "dst.log")
    netns.background(POD, "sidecar", str(tmp_path / "client-0.json"), log=tmp_path / "src.log")
    url = "http://payments.shop.svc.clusterset.local:8080/hello"
    out = subprocess.run(
        ["ip", "netns", "exec", POD, "curl", "-sS", "--max-time", "5", url],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.stdout == "hello from payments-0\n", out.stderr + (tmp_path / "src.log").read_text()
    dst_log = [json.loads(line) for line in (tmp_path / "dst.log").read_text().splitlines()]
    accepted = [e for e in dst_log if e.get("event") == "inbound accepted"]
    assert accepted, dst_log
    assert accepted[0]["caller"] == "spiffe://east.fedgate.local/ns/shop/sa/client"
