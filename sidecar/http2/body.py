"""A request body read from the app's stream as tries send it, kept for replay up to a limit.

HTTP/2 requests may stream (gRPC client and bidirectional streams send messages as they go and
wait for answers), so the body is not read ahead before the first try as HTTP/1.1 does: the
first try sends each chunk as soon as it arrives, and the chunks are kept meanwhile. If the body
ends within `REPLAY_LIMIT` (the HTTP/1.1 path's limit), a retry or a mirror sends it again from
the start; beyond the limit the kept chunks are dropped and the request is tried once.
Only the primary try reads from the app (`drive=True`); a mirror follows what it read, so it
never pulls the body faster than the primary's upstream takes it.
"""

from __future__ import annotations

import asyncio

from sidecar.errors import ProxyError
from sidecar.http.body import REPLAY_LIMIT
from sidecar.http2.conn import H2Conn
from sidecar.http2.session import Data, Ended, Fields, Headers, Reset, StreamEvent, Trailers


class StreamBody:
    def __init__(self, app: H2Conn, sid: int, ended: bool, limit: int = REPLAY_LIMIT) -> None:
        self._app = app
        self._sid = sid
        self._limit = limit
        self.chunks: list[bytes] = []
        self.base = 0  # index of chunks[0] (chunks below were dropped past the limit)
        self.size = 0
        self.complete = ended
        self.overflow = False
        self.trailers: Fields | None = None
        self._reading = False
        self._changed = asyncio.Event()

    @property
    def empty(self) -> bool:
        """Known to have no body at all (the HEADERS ended the stream)."""
        return self.complete and self.size == 0 and self.trailers is None

    @property
    def replayable(self) -> bool:
        return self.complete and not self.overflow

    async def get(self, i: int, drive: bool = True) -> bytes | None:
        """Chunk `i` (None after the last). ProxyError if it was dropped or the app failed."""
        while True:
            if i < self.base:
                raise ProxyError("body not kept", f"over the {self._limit}-byte replay limit")
            if i - self.base < len(self.chunks):
                return self.chunks[i - self.base]
            if self.complete:
                return None
            if self._reading or not drive:
                changed = self._changed
                await changed.wait()
                continue
            self._reading = True
            try:
                await self._read_one()
            finally:
                self._reading = False
                self._pulse()

    def take_ready(self) -> None:
        """Take what has arrived already, without waiting (a unary call's whole body usually
        comes with its HEADERS: then no task needs to stream it)."""
        took = False
        while not self.complete and not self._reading:
            event = self._app.try_next(self._sid)
            if event is None:
                break
            self._apply(event)
            took = True
        if took:
            self._pulse()

    def _pulse(self) -> None:
        """Wake whoever follows the body (a mirror): something was read."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _read_one(self) -> None:
        self._apply(await self._app.next(self._sid))

    def _apply(self, event: StreamEvent) -> None:
        match event:
            case Data(data=data, flow=flow, end=end):
                self._app.ack(self._sid, flow)
                if data:
                    self.chunks.append(data)
                    self.size += len(data)
                self.complete = end
                if self.size > self._limit:
                    self.overflow = True
                    # Only the chunk being asked for is still needed.
                    keep = self.chunks[-1:] if data else []
                    self.base += len(self.chunks) - len(keep)
                    self.chunks = keep
            case Trailers(headers=headers):
                self.trailers = headers
                self.complete = True
            case Ended():
                self.complete = True
            case Reset(code=code):
                raise ProxyError("client reset", f"the app reset the stream (code {code})")
            case Headers():
                raise ProxyError("malformed request", "a second HEADERS block without end")
