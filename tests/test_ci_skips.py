"""tests/conftest.py's rule: under `CI=true` a skipped test fails, with the skip's reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SKIPPING = """
import pytest

@pytest.mark.skipif(True, reason="frobnicator is not installed")
def test_marked() -> None:
    pass

def test_called() -> None:
    pytest.skip("needs root")

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure() -> None:
    raise AssertionError
"""


def run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(ROOT)
    argv = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider"]
    return subprocess.run(
        [*argv, "-rA", "test_skipping.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_under_ci_a_skip_is_a_failure_naming_its_reason(tmp_path: Path) -> None:
    done = run(tmp_path, "true")
    # The skipif mark acts in setup, so that test errors; pytest.skip() in the test fails it.
    assert "1 failed, 1 xfailed, 1 error" in done.stdout, done.stdout
    assert "frobnicator is not installed" in done.stdout
    assert "needs root" in done.stdout


def test_elsewhere_a_skip_stays_a_skip(tmp_path: Path) -> None:
    for ci in (None, "false"):
        done = run(tmp_path, ci)
        assert "2 skipped, 1 xfailed" in done.stdout, done.stdout
