"""`mesh.tasks.TaskSet`: closing it ends every task, even one that loses a cancellation."""

from __future__ import annotations

import asyncio

from mesh.tasks import TaskSet


async def test_aclose_ends_a_task_that_swallowed_its_first_cancellation() -> None:
    cancels = 0

    async def stubborn() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels += 1
                if cancels > 1:
                    raise
                # As Python 3.11's wait_for can: the cancellation is lost, the loop goes on.

    tasks = TaskSet("test")
    tasks.spawn(stubborn(), "stubborn")
    await asyncio.sleep(0)  # let it reach its first await
    async with asyncio.timeout(10):
        await tasks.aclose()
    assert cancels == 2
