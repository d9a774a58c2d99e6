"""An injected pod's network set-up, reproduced in real network namespaces as a node would.

The pod namespace gets what the injected manifest says: the sysctls of its securityContext (the
container runtime sets them), then `fedgate-init`'s command line run as written (real
iptables). A process with the sidecar's UID/GID 1337 (`setpriv`, as `runAsUser`/`runAsGroup`
do) then binds what the injected sidecar binds. A peer namespace on a veth pair stands where the
kubelet and Prometheus are. Checked: the sidecar can bind DNS port 53 without privileges only
thanks to the sysctl; the probe port is reachable from outside, an application port is not;
an application's DNS query to the first nameserver of the injected dnsConfig is answered by
the sidecar's DNS server.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.clusters.inject.conftest import GOLDEN, objects

REPO = Path(__file__).resolve().parents[3]
HELPER = Path(__file__).with_name("pod_helper.py")
TAG = f"fgi-t{os.getpid()}"
POD, NODE = f"{TAG}-pod", f"{TAG}-node"
POD_IP, NODE_IP = "10.98.0.1", "10.98.0.2"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _in(ns: str, argv: list[str], uid: int | None = None) -> list[str]:
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid else []
    return ["ip", "netns", "exec", ns, *drop, *argv]


def helper(ns: str, *args: str, uid: int | None = None) -> str:
    out = subprocess.run(
        _in(ns, [sys.executable, str(HELPER), *args], uid),
        capture_output=True,
        text=True,
        timeout=20,
        env=_env(),
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def namespaces() -> Iterator[None]:
    for ns in (POD, NODE):
        _ip("netns", "del", ns, check=False)
    _ip("netns", "add", POD)
    try:
        _ip("netns", "add", NODE)
        for ns in (POD, NODE):
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", POD, "link", "add", "fgi0", "type", "veth", "peer", "name", "fgi1", "netns", NODE)
        for ns, address, dev in ((POD, POD_IP, "fgi0"), (NODE, NODE_IP, "fgi1")):
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        yield
    finally:
        for ns in (POD, NODE):
            _ip("netns", "del", ns, check=False)


def _injected_pod_spec() -> dict[str, Any]:
    (deployment,) = objects((GOLDEN / "deployment-with-init.yaml").read_text())
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def _wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    assert ready, "the sidecar stand-in did not start"
    assert proc.stdout.readline().strip() == "ready"


@pytest.mark.usefixtures("namespaces")
def test_the_injected_pod_works_in_a_real_namespace() -> None:
    assert shutil.which("setpriv") is not None
    spec = _injected_pod_spec()
    init, proxy = spec["initContainers"][:2]
    uid = proxy["securityContext"]["runAsUser"]
    assert uid == proxy["securityContext"]["runAsGroup"] == 1337

    # Without the sysctl, UID 1337 may not bind the DNS port.
    assert helper(POD, "bind53", uid=uid) == "error PermissionError"
    for sysctl in spec["securityContext"]["sysctls"]:
        subprocess.run(
            _in(POD, ["sysctl", "-w", f"{sysctl['name']}={sysctl['value']}"]),
            check=True,
            capture_output=True,
            timeout=10,
        )
    assert helper(POD, "bind53", uid=uid) == "ok"

    # fedgate-init, as written in the manifest (root: the kubelet runs it with NET_ADMIN).
    argv = [sys.executable, "-m", "fedgate", *init["args"]]
    installed = subprocess.run(
        _in(POD, argv), capture_output=True, text=True, timeout=60, env=_env(), check=True
    )
    assert "-A FEDGATE_INBOUND -p tcp --dport 15020 -j ACCEPT" in installed.stdout

    sidecar = subprocess.Popen(
        _in(POD, [sys.executable, str(HELPER), "sidecar"], uid),
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        _wait_ready(sidecar)
        probe = proxy["readinessProbe"]["httpGet"]
        # The kubelet's probe, from outside the pod, reaches the probe port ...
        assert helper(NODE, "get", POD_IP, str(probe["port"]), probe["path"]) == "200"
        # ... while an application port is reachable only through the sidecar's mTLS port.
        assert helper(NODE, "get", POD_IP, "8080", "/") == "error TimeoutError"
        # An application (root here, any UID) resolves clusterset names at the sidecar.
        assert spec["dnsConfig"]["nameservers"][0] == "127.0.0.1"
        assert helper(POD, "dns", "echo.demo.svc.clusterset.local") == "rcode 0 answers 1"
        assert helper(POD, "dns", "nope.demo.svc.clusterset.local") == "rcode 3 answers 0"
    finally:
        sidecar.kill()
        sidecar.wait(timeout=5)
        assert sidecar.stdout is not None
        sidecar.stdout.close()
