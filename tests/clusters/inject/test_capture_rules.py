"""The injected init container installs the rig's capture rules (one source: sidecar.capture).

The rig's sidecar installs `capture_rules(CaptureConfig(ports and GID of its SidecarSettings))`
when it starts; the injected `fedgate-init` runs `fedgate capture install` with the arguments
the injector wrote. Both are compared as text, and as the kernel holds them: each is installed
in a fresh network namespace (`unshare --net`, real iptables) and read back with iptables-save.
The one difference allowed is the sidecar's probe port, accepted in Kubernetes so the kubelet
and Prometheus reach it; the rig reads its sidecars' admin port over loopback.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Any

from click.testing import CliRunner

from clusters.rig import topology
from fedgate.cli import main
from sidecar.capture import CaptureConfig, capture_rules
from sidecar.settings import SidecarSettings
from tests.clusters.inject.conftest import GOLDEN, objects

PROBE_ACCEPT = "-A FEDGATE_INBOUND -p tcp --dport 15020 -j ACCEPT"


def _init_container() -> dict[str, Any]:
    (deployment,) = objects((GOLDEN / "deployment-with-init.yaml").read_text())
    init = deployment["spec"]["template"]["spec"]["initContainers"][0]
    assert init["name"] == "fedgate-init"
    assert init["command"] == ["fedgate"]
    assert init["args"][:2] == ["capture", "install"]
    return init


def _rig_rules() -> str:
    """What a rig sidecar installs (sidecar.sidecar.Sidecar.start, default settings)."""
    s = SidecarSettings(cluster="east", pod="client", namespace="demo")
    assert (s.outbound_port, s.inbound_port) == (
        topology.SIDECAR_OUTBOUND_PORT,
        topology.SIDECAR_INBOUND_PORT,
    )
    return capture_rules(CaptureConfig(s.outbound_port, s.inbound_port, s.proxy_gid))


def test_the_init_container_makes_the_rigs_rules_plus_the_probe_port() -> None:
    args = _init_container()["args"]
    printed = CliRunner().invoke(main, ["capture", "rules", *args[2:]])
    assert printed.exit_code == 0, printed.output
    init_lines = printed.stdout.splitlines()
    assert PROBE_ACCEPT in init_lines
    assert [line for line in init_lines if line != PROBE_ACCEPT] == _rig_rules().splitlines()


def _installed(argv: list[str]) -> list[str]:
    """Run `argv` in a new network namespace, then iptables-save there (comments dropped)."""
    iptables_save = shutil.which("iptables-save")
    assert iptables_save is not None
    script = '"$@" >/dev/null && exec "$0"'
    out = subprocess.run(
        ["unshare", "--net", "sh", "-c", script, iptables_save, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if not line.startswith("#")]


def test_installed_in_a_namespace_they_differ_only_by_the_probe_port() -> None:
    args = _init_container()["args"]
    injected = _installed([sys.executable, "-m", "fedgate", *args])
    rig = _installed(
        [
            sys.executable,
            "-c",
            "import sys; from sidecar.capture import install; install(sys.argv[1])",
            _rig_rules(),
        ]
    )
    assert "-A FEDGATE_OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN " in "\n".join(rig)
    extra = [line for line in injected if line not in rig]
    assert extra == ["-A FEDGATE_INBOUND -p tcp -m tcp --dport 15020 -j ACCEPT"]
    assert [line for line in injected if line not in extra] == rig
