"""The suite's two small helpers: a free loopback port, and polling until something holds.

Poll only for state with no event to wait on (another process, a socket, our own objects'
counters); a unit test with a fake clock never polls. `until` is for async tests, `until_sync`
for the rest; both call `probe()` (`until` awaits it when it returns an awaitable), pass while
`check(value)` is false, and return the value that passed. After `within` seconds they fail
with `what` and the last value seen.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port nothing is bound to on `host` right now (TCP unless `kind` says otherwise)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _Poll:
    """One polling run's bookkeeping: the deadline, the last value and the last error."""

    def __init__(self, within: float, what: str) -> None:
        self.deadline = time.monotonic() + within
        self.within, self.what = within, what
        self.last: object = None
        self.error: Exception | None = None

    def raise_if_late(self) -> None:
        if time.monotonic() <= self.deadline:
            return
        message = f"{self.what}: not within {self.within} s; last value: {self.last!r}"
        raise AssertionError(message) from self.error


async def until(
    probe: Callable[[], T] | Callable[[], Awaitable[T]],
    within: float = 5.0,
    *,
    check: Callable[[T], object] = bool,
    what: str = "condition",
    interval: float = 0.01,
    ignoring: tuple[type[Exception], ...] = (),
) -> T:
    """Await until `check(probe())` holds (exceptions in `ignoring` count as not yet)."""
    poll = _Poll(within, what)
    while True:
        try:
            got: Any = probe()
            if inspect.isawaitable(got):
                got = await got
            poll.last = got
            if check(got):
                return got  # type: ignore[no-any-return]
        except ignoring as e:
            poll.error = e
        poll.raise_if_late()
        await asyncio.sleep(interval)


def until_sync(
    probe: Callable[[], T],
    within: float = 5.0,
    *,
    check: Callable[[T], object] = bool,
    what: str = "condition",
    interval: float = 0.1,
    ignoring: tuple[type[Exception], ...] = (),
) -> T:
    """Sleep until `check(probe())` holds; for tests that drive other processes."""
    poll = _Poll(within, what)
    while True:
        try:
            got = probe()
            poll.last = got
            if check(got):
                return got
        except ignoring as e:
            poll.error = e
        poll.raise_if_late()
        time.sleep(interval)
