"""GitOps on the rig: a commit to the config repository moves real traffic; a bad one does not.

The rig's config repository is a plain git repository in the rig directory; the sync follows
it, etcd carries the applied config, the controller pushes it to every sidecar.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusters.rig import bringup, config_repo, control, lifecycle
from fedgate.demo import curl_many, policy_weights, wait_policy
from tests.e2e.conftest import revive_agents

pytestmark = pytest.mark.rig

ECHO = "http://echo.demo.svc.clusterset.local:8080/"
APPLY_WITHIN = 30.0  # poll (0.5 s) + etcd + controller debounce + config stream, generously


def config_status(rig: Path) -> str:
    plan = control.load(rig, lifecycle.load(rig).prefix)
    fedgate = [sys.executable, "-m", "fedgate"]
    res = subprocess.run(
        ["ip", "netns", "exec", plan.netns, *fedgate, "config", "status", "--etcd", plan.etcd_arg],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def both_clusters_serve_echo(rig: Path) -> None:
    """Other tests of the session kill agents; cross-cluster weights need both clusters back."""
    revive_agents(rig)
    bringup.wait_routes(rig, "echo", "demo", len(lifecycle.load(rig).clusters))


def test_a_commit_moves_traffic_and_a_bad_commit_keeps_it_flowing(rig: Path) -> None:
    both_clusters_serve_echo(rig)
    repo = config_repo.repo_dir(rig)
    policy = config_repo.ECHO_POLICY_FILE
    try:
        good = config_repo.commit(
            repo, {policy: config_repo.echo_policy(0, 100)}, "echo: all remote"
        )
        took = wait_policy(rig, 0, 100, APPLY_WITHIN)
        print(f"commit {good[:12]} reached both client sidecars in {took:.1f} s")
        assert good in config_status(rig)
        counts, failures = curl_many(rig, "east/client", ECHO, 40)
        assert (failures, dict(counts)) == (0, {"west": 40})

        bad = config_repo.commit(
            repo,
            {policy: config_repo.echo_policy(100, 0) + "  timeOut: 2s\n"},
            "echo: typo in a field name",
        )
        deadline = time.monotonic() + APPLY_WITHIN
        while f"rejected: {bad}" not in (status := config_status(rig)):
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert f"applied: {good}" in status
        assert "policies/echo.yaml:13: document 1: spec.timeOut: unknown field" in status
        # Traffic keeps flowing on the last good config.
        counts, failures = curl_many(rig, "east/client", ECHO, 40)
        assert (failures, dict(counts)) == (0, {"west": 40})
        assert policy_weights(rig, "east") == [("local", 0), ("remote", 100)]
    finally:
        config_repo.commit(repo, {policy: config_repo.echo_policy(70, 30)}, "echo: back to 70/30")
        wait_policy(rig, 70, 30, APPLY_WITHIN)
