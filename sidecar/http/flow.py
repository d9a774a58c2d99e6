"""`FlowConn`: a `sidecar.pipe.Conn` a coroutine can also read and write with backpressure.

The L4 path splices two connections and never reads in Python; the HTTP path parses, so it
reads (`read_some`) and writes with `drain`, which waits while the transport's write buffer is
above its high-water mark (`pause_writing`/`resume_writing`). Reading is bounded by `Conn`
itself: over `BUFFER_LIMIT` unread bytes it pauses the socket. Spliced, a `FlowConn` is a plain
`Conn` (an upgraded HTTP connection is relayed like any TCP one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sidecar.errors import ProxyError
from sidecar.pipe import Conn


def _take_all(buf: bytes) -> tuple[bytes, bytes] | None:
    return (buf, b"") if buf else None


def _peek(buf: bytes) -> tuple[bytes, bytes] | None:
    return (buf, buf) if buf else None


class FlowConn(Conn):
    def __init__(self, label: str, on_made: Callable[[Conn], None] | None = None) -> None:
        super().__init__(label, on_made)
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        self._write_paused = True

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_paused = False
        self._wake_drain()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._wake_drain()

    # -- coroutine interface ----------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Open both ways with nothing unexpected pending (may carry another request)."""
        return (
            not self.closed.done()
            and self.error is None
            and not self.eof
            and not self.eof_sent
            and not self._buf
            and self._transport is not None
            and not self._transport.is_closing()
        )

    async def read_some(self) -> bytes:
        """What has arrived (waiting for something); b"" once the peer ended cleanly.
        Raises ProxyError if the connection failed."""
        try:
            return await self.read_frame(_take_all, "data")
        except ProxyError:
            if self.eof and self.error is None and not self._buf:
                return b""
            raise

    async def peek(self) -> bytes:
        """What has arrived, left buffered (for protocol sniffing); b"" at a clean end."""
        try:
            return await self.read_frame(_peek, "data")
        except ProxyError:
            if self.eof and self.error is None:
                return b""
            raise

    async def close_gracefully(self, grace: float) -> None:
        """End our direction, wait (bounded) for the peer to end its own, then close.

        Closing the socket right after our close_notify would make the peer's reply (its own
        close_notify and FIN) meet a reset; waiting lets both ends finish cleanly."""
        self.write_eof()
        try:
            async with asyncio.timeout(grace):
                while not self.eof and not self.closed.done() and self.error is None:
                    self._buf.clear()  # an idle connection has nothing we want
                    await self._wait()
        except TimeoutError:
            self.reset_if_open()
            return
        self.close()

    async def drain(self) -> None:
        """Wait while our writes are backed up; ProxyError if the connection is gone."""
        while self._write_paused and not self.closed.done():
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drain_waiter = fut
            try:
                await fut
            finally:
                self._drain_waiter = None
        if self.closed.done() or self.error is not None:
            raise self.error or ProxyError("peer closed", f"{self.label} closed")

    def _wake_drain(self) -> None:
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)


async def open_flow_conn(host: str, port: int, label: str, connect_timeout: float) -> FlowConn:
    """`sidecar.pipe.open_conn`, for a `FlowConn`."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            _, conn = await loop.create_connection(lambda: FlowConn(label), host, port)
    except TimeoutError as e:
        raise ProxyError(
            "connect failed", f"{host}:{port}: timed out after {connect_timeout} s"
        ) from e
    except OSError as e:
        raise ProxyError("connect failed", f"{host}:{port}: {e.strerror or e}") from e
    return conn
