"""Suite-wide rules: a resource a test leaks is that test's failure, not its neighbour's."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    # Unclosed transports and sockets warn only when collected; collecting here makes
    # pytest's unraisable-exception check (warnings are errors) blame the test that leaked.
    yield
    gc.collect()
