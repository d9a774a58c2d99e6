"""Fixtures for the federation tests: a real etcd (shared), a fresh client per test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

import pytest

from tests.etcd_fixture import etcd, etcd_server

__all__ = ["etcd", "etcd_server"]

T = TypeVar("T")


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
