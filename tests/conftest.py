"""Suite-wide rules: a resource a test leaks is that test's failure, not its neighbour's; and
under `CI=true` a skipped test is a failure. Also the `logs` fixture (a structlog capture).

Every skip in this suite means the machine lacks something the test needs (root, network
namespaces, iptables, chromium, ...). `make test` installs all of it, so on CI, where a fresh
machine must run every test, such a skip would hide a broken install: it is reported as a
failure with the skip's reason instead.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Generator, Iterator

import pytest
import structlog
from structlog.testing import LogCapture


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    # Unclosed transports and sockets warn only when collected; collecting here makes
    # pytest's unraisable-exception check (warnings are errors) blame the test that leaked.
    yield
    gc.collect()


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """Capture structlog records; must be set up before the code under test binds its loggers."""
    capture = LogCapture()
    old = structlog.get_config()
    structlog.configure(processors=[capture], cache_logger_on_first_use=False)
    try:
        yield capture
    finally:
        structlog.configure(**old)


def skips_fail() -> bool:
    """Whether a skip is a failure here: on CI (`CI=true`, as CI services set it)."""
    return os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not (report.skipped and skips_fail()) or hasattr(report, "wasxfail"):
        return
    # A skip's longrepr is (file, line, "Skipped: <reason>") for skipif marks and pytest.skip().
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI=true, where every test must run ({item.nodeid}): {reason}\n"
        "`make test` installs every tool the suite needs; this machine lacks one."
    )
