"""Every proxy converges: many config streams, heavy churn, a replica restart (issue 15).

The harness is `tests.federation.churn` (what each round does is in its docstring); a longer
variant is `bench/config_convergence.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import structlog

from tests.federation.churn import GRPC_STATUS_TASK, run_round
from tests.wires import wire  # noqa: F401  (the fixture)

# grpc.aio's own `_AioCall._handle_status_once_received` tasks of calls to the replica the
# round restarts stay "cancelling" after their channels closed (grpcio 1.85); every other task
# must be gone, as `no_leaked_tasks` demands elsewhere.

pytestmark = pytest.mark.usefixtures("wire")


@pytest.fixture(autouse=True)
async def no_leaked_tasks_of_ours() -> AsyncIterator[None]:
    before = set(asyncio.all_tasks())
    yield
    current = asyncio.current_task()
    leaked = [
        t.get_name()
        for t in asyncio.all_tasks() - before
        if t is not current and not t.done() and t.get_coro().__qualname__ != GRPC_STATUS_TASK
    ]
    assert not leaked, f"tasks leaked: {leaked}"


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    # 100 proxies log every ACK; keep the captured output small, and give the next tests back
    # the configuration they capture logs with.
    before = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    try:
        yield
    finally:
        structlog.reset_defaults()
        structlog.configure(**before)


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_hundred_proxies_converge_after_two_hundred_versions(seed: int) -> None:
    result = await run_round(proxies=100, versions=200, seed=seed)
    assert result.died == []  # no proxy's config stream ended for good
    assert result.behind == []
    assert result.lagging == []  # and every replica knows it: lag 0 everywhere
    assert result.converged == 100
    assert result.nacks > 0  # the refusing proxies did refuse (and resynced after)
    assert result.failovers > 0  # the restarted replica's proxies moved
