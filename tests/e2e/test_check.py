"""`fedgate check --rig-dir` on the rig, twice: every check passes (✓, exit 0) on the healthy
rig; once west's gateway is killed it fails (✗, exit 1) on that gateway and on both links, each
with a hint, while the rest still passes. The gateway is restarted and the rig left healthy.
Then a commit the GitOps sync rejects shows as ✗ with its issue, until a good commit follows.

The command runs as an operator runs it (a subprocess, re-running itself in the rig's control
namespace); the test reads its `--json` results and prints its text output (`-s`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clusters.rig import config_repo, control, lifecycle
from tests.e2e.test_topology_page import cross_cluster_calls
from tests.helpers import until_sync

pytestmark = pytest.mark.rig


@dataclass(frozen=True)
class Run:
    code: int
    results: list[dict[str, Any]]

    def by_status(self, status: str) -> list[str]:
        return [r["name"] for r in self.results if r["status"] == status]

    def result(self, name: str) -> dict[str, Any]:
        return next(r for r in self.results if r["name"] == name)


def check(rig: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedgate", "check", "--rig-dir", str(rig), *extra],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def check_json(rig: Path) -> Run:
    done = check(rig, "--json")
    assert done.stdout, done.stderr[-2000:]
    return Run(done.returncode, json.loads(done.stdout))


def all_ok(run: Run) -> bool:
    return run.code == 0 and run.by_status("ok") == [r["name"] for r in run.results]


def west_gateway_failing(run: Run) -> bool:
    return run.code == 1 and set(run.by_status("fail")) == {
        "gateway of west answers",
        "link east -> west is healthy",
        "link west -> east is healthy",
    }


def test_check_passes_on_a_healthy_rig_and_fails_with_hints_without_a_gateway(rig: Path) -> None:
    cross_cluster_calls(rig)  # tunnels open on the first call: before it, links are idle (‼)
    healthy = until_sync(lambda: check_json(rig), 30, check=all_ok, what="every check ✓")
    names = [r["name"] for r in healthy.results]
    replicas = control.load(rig, lifecycle.load(rig).prefix).controllers
    for expected in (
        *(f"controller {r.admin} is reachable" for r in replicas),
        "a leader is elected",
        "the config version is acked by every proxy",
        "cluster east is live",
        "cluster west is live",
        "gateway of east answers",
        "gateway of west answers",
        "link east -> west is healthy",
        "link west -> east is healthy",
        "SVID of gateway west is valid",
        "clock of gateway west is in sync",
        "a GitOps commit is applied",
        "no GitOps commit is rejected",
    ):
        assert expected in names, f"{expected!r} not checked; checked: {names}"
    assert "rtt " in healthy.result("link east -> west is healthy")["detail"]
    assert any(n.startswith("root of east.") for n in names), names
    text = check(rig)
    print(text.stdout)
    assert text.returncode == 0
    assert "✗" not in text.stdout
    assert "‼" not in text.stdout

    record = lifecycle.load(rig).process("west-gateway")
    assert record is not None
    os.kill(record.pid, signal.SIGKILL)
    killed = time.monotonic()
    try:
        failing = until_sync(
            lambda: check_json(rig), 20, check=west_gateway_failing, what="west's gateway ✗"
        )
        took = time.monotonic() - killed
        print(f"fedgate check fails on west's gateway {took:.1f} s after the kill")
        for name in failing.by_status("fail"):
            assert failing.result(name)["hint"], f"{name!r} fails without a hint"
        assert "unreachable" in failing.result("link east -> west is healthy")["detail"]
        text = check(rig)
        print(text.stdout)
        assert text.returncode == 1
        assert "✗ gateway of west answers" in text.stdout
        assert "hint: " in text.stdout
        assert "✓ cluster west is live" in text.stdout  # its agent still holds the lease
    finally:
        control.restart(rig, "west-gateway")
    cross_cluster_calls(rig)  # re-dials the tunnels to the new west gateway
    until_sync(lambda: check_json(rig), 30, check=all_ok, what="every check ✓ again")


def test_check_shows_a_rejected_commit_with_its_issues(rig: Path) -> None:
    cross_cluster_calls(rig)
    repo, policy = config_repo.repo_dir(rig), config_repo.ECHO_POLICY_FILE
    same_weights = config_repo.echo_policy(70, 30)  # the rig's own: traffic does not change
    bad = config_repo.commit(repo, {policy: same_weights + "  timeOut: 2s\n"}, "echo: a typo")
    try:
        run = until_sync(
            lambda: check_json(rig),
            30,
            check=lambda r: r.code == 1 and r.by_status("fail") == ["no GitOps commit is rejected"],
            what="the rejected commit ✗",
        )
        rejected = run.result("no GitOps commit is rejected")
        assert rejected["detail"].startswith(f"{bad[:12]} rejected at ")
        assert any("spec.timeOut: unknown field" in n for n in rejected["notes"]), rejected
        print(check(rig).stdout)
    finally:
        good = config_repo.commit(repo, {policy: same_weights}, "echo: the typo fixed")
    fixed = until_sync(lambda: check_json(rig), 30, check=all_ok, what="every check ✓ again")
    assert fixed.result("a GitOps commit is applied")["detail"].startswith(good[:12])
