"""Fixtures for the federation tests: a real etcd (shared), a fresh client per test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
from etcd3aio import Etcd3Client

from federation.etcd import open_client
from tests.etcd_fixture import EtcdServer, etcd_server, reset_etcd

__all__ = ["etcd_server"]

T = TypeVar("T")


@pytest.fixture
async def etcd(etcd_server: EtcdServer) -> AsyncIterator[Etcd3Client]:
    client = await open_client([etcd_server.endpoint])
    await reset_etcd(client)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    """A test that leaves a task of its own running fails (a leaked task is a bug).

    Async test modules apply it with `pytestmark = pytest.mark.usefixtures("no_leaked_tasks")`.
    """
    before = set(asyncio.all_tasks())
    yield
    current = asyncio.current_task()

    def stragglers() -> list[asyncio.Task[object]]:
        return [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]

    # Tasks already cancelled (grpc's call bookkeeping after a channel closes) need a few loop
    # turns to finish: give them up to a second, bounded, before calling them leaked.
    pending = stragglers()
    if pending:
        await asyncio.wait(pending, timeout=1.0)
    leaked = stragglers()
    for task in leaked:
        task.cancel()
    assert not leaked, f"tasks leaked: {[t.get_name() for t in leaked]}"


async def eventually(
    probe: Callable[[], Awaitable[T]],
    check: Callable[[T], bool],
    within: float = 5.0,
    interval: float = 0.05,
) -> T:
    """Poll `probe` until `check` holds or `within` seconds pass (then fail with the last value)."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if check(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within} s; last value: {value!r}")
        await asyncio.sleep(interval)


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll a synchronous `condition` every 10 ms until it holds or `within` seconds pass."""
    deadline = time.monotonic() + within
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within} s")
        await asyncio.sleep(0.01)
