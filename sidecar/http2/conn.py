"""The asyncio driver of one HTTP/2 connection: an `H2Session` over a `FlowConn`.

One reader task feeds the socket's bytes to the session and sorts its events into per-stream
queues; coroutines read a stream's events with `next`, send with `send_headers` / `send_data`
(which waits for flow-control windows and the socket's write buffer), and hand received bytes
back to the peer with `ack` once they moved on. A stream's queue holds at most what its
receive window lets the peer send (`session.WINDOW`), because nothing is acknowledged before
it is consumed.

Server side (an app connection), a HEADERS frame on a new stream is announced through
`on_stream`; client side (a pooled upstream), `open` allocates stream ids. When the peer resets
a stream, `on_reset` lets the owner cancel whatever works for it. When the connection ends,
every open stream gets a `Reset` and `closed` resolves. What this module does not do: HTTP
semantics (see `sidecar.http2.messages`), routing, pooling.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from mesh.tasks import TaskSet
from sidecar.errors import ProxyError, UnprocessedError
from sidecar.http.flow import FlowConn
from sidecar.http2.session import (
    CANCEL,
    INTERNAL_ERROR,
    NO_ERROR,
    REFUSED_STREAM,
    Data,
    Ended,
    Fields,
    GoneAway,
    H2Session,
    H2SessionError,
    Headers,
    Reset,
    SettingsChanged,
    StreamClosedError,
    StreamEvent,
    Trailers,
    WindowOpened,
)

LOST = -1  # the code of the `Reset` a stream gets when its connection ended


@dataclass(eq=False, slots=True)
class _Stream:
    events: collections.deque[StreamEvent] = field(default_factory=collections.deque)
    waiter: asyncio.Future[None] | None = None


class H2Conn:
    def __init__(
        self,
        conn: FlowConn,
        client: bool,
        *,
        on_stream: Callable[[int, Headers], None] | None = None,
        on_reset: Callable[[int], None] | None = None,
    ) -> None:
        self.conn = conn
        self.session = H2Session(client)
        self._streams: dict[int, _Stream] = {}
        self._on_stream = on_stream
        self._on_reset = on_reset
        self._window: asyncio.Event = asyncio.Event()
        self.error: ProxyError | None = None
        self.gone_away: GoneAway | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_change: Callable[[], None] | None = None  # slots or liveness changed
        self._flush_soon = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Send our preface and settings (before `open` or `run`)."""
        self.session.start()
        self._flush()

    async def run(self) -> None:
        """Read until the connection ends (run as the connection's task, after `start`)."""
        self.conn.resume_reading()
        try:
            while True:
                data = await self.conn.read_some()
                if not data:
                    return  # the peer closed cleanly; streams still open are lost
                try:
                    events = self.session.receive(data)
                except H2SessionError as e:
                    self._flush_now()  # our GOAWAY
                    raise ProxyError("http2 protocol error", str(e)) from e
                for event in events:
                    self._dispatch(event)
                self._flush()
                if self.gone_away is not None and not self._streams:
                    return
        except ProxyError as e:
            self.error = e
        finally:
            self._end()

    @property
    def alive(self) -> bool:
        return not self.closed.done() and self.gone_away is None and not self.session.gone_away

    def close(self, detail: str = "") -> None:
        """GOAWAY, then close the socket once no stream is left (now if none is)."""
        self.session.close(detail=detail)
        self._flush_now()
        if not self._streams:
            self.conn.write_eof()
            self.conn.close()

    def drain(self, detail: str = "") -> None:
        """GOAWAY that lets the streams the peer opened so far finish; the socket closes when
        the last one is released (server side: `sidecar.inbound_gate`)."""
        self.session.drain(detail)
        self._flush()
        if not self._streams:
            self._flush_now()
            self.conn.write_eof()
            self.conn.close()

    def abort(self) -> None:
        self.conn.reset_if_open()

    # -- streams ----------------------------------------------------------------------------

    @property
    def streams(self) -> int:
        return len(self._streams)

    def room(self) -> bool:
        """Whether another stream may be opened now (client side)."""
        return self.alive and len(self._streams) < self.session.max_outbound_streams

    def open(self, fields: Fields, end: bool) -> int:
        """Open a stream with its HEADERS (client side); its id. UnprocessedError if the
        request cannot go out on this connection (nothing of it was sent)."""
        if not self.alive or self.error is not None:
            why = "is going away" if self.gone_away or self.session.gone_away else "is closed"
            raise UnprocessedError("stream refused", f"{self.conn.label} {why}")
        sid = self.session.new_stream()
        try:
            self.session.send_headers(sid, fields, end)
        except StreamClosedError as e:  # e.g. the peer lowered its stream limit meanwhile
            raise UnprocessedError("stream refused", str(e)) from e
        self._streams[sid] = _Stream()
        self._flush()
        return sid

    async def next(self, sid: int) -> StreamEvent:
        """The stream's next event (a `Reset` with code `LOST` if the connection ended)."""
        st = self._streams.get(sid)
        if st is None:
            return Reset(sid, LOST)
        while not st.events:
            if self.closed.done():
                return Reset(sid, LOST)
            fut = st.waiter = asyncio.get_running_loop().create_future()
            try:
                await fut
            finally:
                st.waiter = None
        return st.events.popleft()

    def try_next(self, sid: int) -> StreamEvent | None:
        """The stream's next event if one has arrived already (no wait)."""
        st = self._streams.get(sid)
        return st.events.popleft() if st is not None and st.events else None

    def ack(self, sid: int, flow: int) -> None:
        self.session.ack(sid, flow)
        self._flush()

    def send_headers(self, sid: int, fields: Fields, end: bool = False) -> None:
        self._check()
        try:
            self.session.send_headers(sid, fields, end)
        except StreamClosedError as e:
            raise ProxyError("stream closed", str(e)) from e
        self._flush()

    async def send_data(self, sid: int, data: bytes, end: bool = False) -> None:
        view = memoryview(data)
        while True:
            self._check()
            if sid not in self._streams:
                raise ProxyError("stream reset", f"{self.conn.label} stream {sid} is gone")
            self._window.clear()
            try:
                n = self.session.send_data(sid, view, end)
            except StreamClosedError as e:
                raise ProxyError("stream closed", str(e)) from e
            self._flush()
            view = view[n:]
            if not view:
                break
            if n == 0:
                await self._window.wait()
        await self.conn.drain()

    def end_stream(self, sid: int) -> None:
        self._check()
        try:
            self.session.end_stream(sid)
        except StreamClosedError as e:
            raise ProxyError("stream closed", str(e)) from e
        self._flush()

    def reset(self, sid: int) -> None:
        """Reset a stream we still track; whoever waits on it sees a `Reset` (CANCEL)."""
        if sid in self._streams:
            self.session.reset(sid, CANCEL)
            self._flush()
            self._push(sid, Reset(sid, int(CANCEL)))
            self._window.set()

    def release(
        self, sid: int, reset: bool = False, *, early: bool = False, refused: bool = False
    ) -> None:
        """We are done with a stream: forget it, give back the window its unread data holds,
        and reset it if `reset` (abandoned half-way: CANCEL; `refused`: never processed,
        REFUSED_STREAM, which the peer may retry; `early`: we answered before the request
        ended, NO_ERROR as RFC 9113 §8.1 says)."""
        st = self._streams.pop(sid, None)
        if st is None:
            return
        if refused:
            self.session.reset(sid, REFUSED_STREAM)
        elif reset or early:
            self.session.reset(sid, NO_ERROR if early and not reset else CANCEL)
        for event in st.events:
            if isinstance(event, Data):
                self.session.ack(sid, event.flow)
        self._flush()
        if self.on_change is not None:
            self.on_change()
        if self.session.gone_away and not self._streams and not self.closed.done():
            self._flush_now()
            self.conn.write_eof()
            self.conn.close()

    # -- internals --------------------------------------------------------------------------

    def _dispatch(self, event: object) -> None:
        match event:
            case Headers(stream=sid) if sid not in self._streams and not self.session.client:
                self._streams[sid] = _Stream()  # the head itself goes to on_stream
                if self._on_stream is not None:
                    self._on_stream(sid, event)
            case Headers(stream=sid) | Trailers(stream=sid) | Ended(stream=sid):
                self._push(sid, event)
            case Data(stream=sid, flow=flow):
                if sid in self._streams:
                    self._push(sid, event)
                else:
                    self.session.ack(sid, flow)  # a stream we released: keep the window open
            case Reset(stream=sid):
                self._window.set()  # a sender waiting for this stream's window must look
                if sid in self._streams:
                    self._push(sid, event)
                    if self._on_reset is not None:
                        self._on_reset(sid)
            case WindowOpened():
                self._window.set()
            case SettingsChanged():
                if self.on_change is not None:
                    self.on_change()
            case GoneAway(last_stream=last) as gone:
                self.gone_away = gone
                if self.session.client:
                    # RFC 9113 §6.8: streams above the last one the peer processed were not,
                    # and may be retried elsewhere; they end as the peer refusing them would.
                    for sid in [s for s in self._streams if s > last]:
                        self._push(sid, Reset(sid, int(REFUSED_STREAM)))
                if self.on_change is not None:
                    self.on_change()

    def _push(self, sid: int, event: StreamEvent) -> None:
        st = self._streams[sid]
        st.events.append(event)
        if st.waiter is not None and not st.waiter.done():
            st.waiter.set_result(None)

    def _check(self) -> None:
        if self.closed.done() or self.error is not None:
            raise self.error or ProxyError("connection closed", f"{self.conn.label} is closed")

    def _flush(self) -> None:
        """Write what the session queued at the end of this loop iteration, so the frames of
        one step (HEADERS, DATA, trailers, WINDOW_UPDATEs) leave in one TLS record and one
        send(): a send costs more than the frames (measured: 10 sends per gRPC call through
        the sidecar unbatched, 6 batched)."""
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_soon = False
        out = self.session.data_to_send()
        if out:
            self.conn.write(out)

    def _end(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._window.set()
        for st in self._streams.values():
            if st.waiter is not None and not st.waiter.done():
                st.waiter.set_result(None)
        if self.error is not None:
            self.session.close(INTERNAL_ERROR)
            self._flush_now()
            self.conn.reset_if_open()
        else:
            self._flush_now()
            self.conn.close()
        if self.on_change is not None:
            self.on_change()


StreamHandler = Callable[["H2Conn", int, Headers], Coroutine[Any, Any, None]]


async def serve_streams(
    conn: FlowConn, handle: StreamHandler, owner: str, on_cancel: Callable[[], None] | None = None
) -> H2Conn:
    """Serve a connection as the HTTP/2 server: each stream in a task of its own
    (`handle(h2, sid, head)`), cancelled when the peer resets the stream (`on_cancel` counts
    it). Returns the connection once it ended and every stream's task is done."""
    tasks = TaskSet(owner)
    handlers: dict[int, asyncio.Task[Any]] = {}

    def on_stream(sid: int, head: Headers) -> None:
        task = tasks.spawn(handle(h2, sid, head), f"stream-{sid}")
        handlers[sid] = task
        task.add_done_callback(lambda t: handlers.pop(sid, None))

    def on_reset(sid: int) -> None:
        task = handlers.get(sid)
        if task is not None:
            if on_cancel is not None:
                on_cancel()
            task.cancel()

    h2 = H2Conn(conn, client=False, on_stream=on_stream, on_reset=on_reset)
    h2.start()
    try:
        await h2.run()
    finally:
        await tasks.aclose()
    return h2
