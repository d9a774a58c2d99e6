"""asyncio helpers of the controller.

`wait_event` replaces `with suppress(TimeoutError): async with asyncio.timeout(t): await
event.wait()`: on Python 3.11 that pattern can turn an external cancellation that races the
timeout into a TimeoutError, which the `suppress` then swallows; in a loop the task can then
never be cancelled (seen as a hung controller shutdown). `asyncio.wait` never converts a
cancellation.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, seconds: float | None) -> bool:
    """Wait until `event` is set (True) or `seconds` pass (False)."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=seconds)
    finally:
        waiter.cancel()
    return bool(done)
