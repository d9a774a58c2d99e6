"""The one helper every background task starts through: named, referenced, death logged.

asyncio's event loop keeps only weak references to tasks, so an unreferenced task can vanish;
and a task that dies silently is the worst kind of outage. `TaskSet` fixes both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

_log = logging.getLogger("fedgate.tasks")


class TaskSet:
    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._owner}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            _log.error("task %s died: %r", task.get_name(), exc, exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        pending = set(tasks)
        while pending:
            for t in pending:
                t.cancel()
            # Cancel again rather than wait for ever: a task can lose one cancellation (on
            # Python 3.11, `asyncio.wait_for` drops one that lands as its inner call completes).
            _, pending = await asyncio.wait(pending, timeout=1.0)
        await asyncio.gather(*tasks, return_exceptions=True)
