"""One call through the tunnel: a bidirectional QUIC stream and the phases it goes through.

Opener side: `TunnelStream.read_reply()` waits for the peer's `StreamReply` frame; the bytes
after it wait (within the flow-control window) until a `StreamSink` is attached. Server side:
`HeaderPhase` reads the `StreamHeader` frame through `gateway.framing.HeaderGate` and hands the
stream to the `StreamHandler`, which answers with `refuse()` or attaches a sink after its 200.
Then bytes flow both ways with FIN (half-close) propagated; `reset()` aborts both directions
(RESET_STREAM + STOP_SENDING). The connection driver (`gateway.tunnel`) feeds the events in.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from gateway.errors import TunnelError
from gateway.framing import FrameReader, HeaderAccepted, HeaderGate, HeaderRefused, read_reply
from mesh.codec import StreamHeader, StreamReply, encode_reply
from mesh.errors import CodecError

if TYPE_CHECKING:
    from gateway.tunnel import TunnelConnection

# Application error codes for RESET_STREAM / STOP_SENDING (RFC 9000 §20.2 leaves them to us).
RESET_ABORTED = 0x1  # the TCP side on this end failed or was reset
RESET_PROTOCOL = 0x2  # malformed header or reply


class StreamSink(Protocol):
    """Where a tunnel stream delivers what the peer sent."""

    def stream_data(self, data: bytes) -> None: ...

    def stream_eof(self) -> None: ...

    def stream_reset(self, reason: str) -> None: ...

    def stream_writable(self) -> None: ...


StreamHandler = Callable[["TunnelStream", StreamHeader], None]
"""Server side: called once a stream's header has arrived; must attach a sink or close it."""


class TunnelStream:
    """One call: a bidirectional QUIC stream of a `TunnelConnection`."""

    def __init__(self, conn: TunnelConnection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.recv_done = False  # FIN or reset received (or we stopped reading)
        self.send_done = False  # FIN or reset sent
        self.bytes_in = 0
        self.bytes_out = 0
        self._sink: StreamSink | None = None
        self._pending = bytearray()
        self._pending_eof = False
        self._pending_reset: str | None = None
        self._watching = False
        self._reply: asyncio.Future[StreamReply] | None = None
        self._reader: FrameReader | None = None
        conn.quic.hold(stream_id)  # no sink yet: grant no credit beyond the initial window

    # --- sending ------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.send_done or not data:
            return
        self.bytes_out += len(data)
        self._send(data, False)

    def write_eof(self) -> None:
        if self.send_done:
            return
        self._send(b"", True)
        self.send_done = True
        self.conn._stream_maybe_done(self)

    def reset(self, reason: str, code: int = RESET_ABORTED) -> None:
        """Abort both directions (RESET_STREAM + STOP_SENDING) and drop the sink."""
        self._abort_quic(code)
        self._sink = None
        self.conn.log.debug("stream reset", stream=self.id, reason=reason)
        self.conn._stream_maybe_done(self)

    def _abort_quic(self, code: int) -> None:
        quic = self.conn.quic
        if not self.send_done:
            self.send_done = True
            with contextlib.suppress(ValueError, RuntimeError):
                quic.reset_stream(self.id, code)
        if not self.recv_done:
            self.recv_done = True
            with contextlib.suppress(ValueError):
                quic.stop_stream(self.id, code)
        self.conn.transmit_soon()

    def backlog(self) -> int:
        return self.conn.quic.send_backlog(self.id)

    def notify_writable(self) -> None:
        """Call `sink.stream_writable()` once the backlog is under the low-water mark."""
        if not self._watching:
            self._watching = True
            self.conn._watch(self)

    def hold_credit(self) -> None:
        self.conn.quic.hold(self.id)

    def release_credit(self) -> None:
        self.conn.quic.release(self.id)
        self.conn.transmit_soon()

    # --- receiving ----------------------------------------------------------------------------

    def attach(self, sink: StreamSink) -> None:
        """Deliver everything received so far, then all that follows, to `sink`."""
        self._sink = sink
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            sink.stream_data(data)
        if self._pending_reset is not None:
            sink.stream_reset(self._pending_reset)
        elif self._pending_eof:
            sink.stream_eof()
        self.release_credit()

    async def read_reply(self) -> StreamReply:
        """Client side: wait for the peer's StreamReply (the caller bounds the wait); bytes
        after it stay pending until a sink is attached. Raises TunnelError.

        Call it right after writing the header, before yielding to the loop: bytes that
        arrived earlier would be taken for payload."""
        if self._pending_reset is not None:
            raise TunnelError(self._pending_reset)
        self._reply = asyncio.get_running_loop().create_future()
        self._reader = FrameReader()
        try:
            return await self._reply
        finally:
            self._reply = None
            self._reader = None

    def _reply_data(self, data: bytes) -> None:
        assert self._reply is not None
        assert self._reader is not None
        try:
            got = read_reply(self._reader, data)
        except CodecError as e:
            self._reply.set_exception(TunnelError(f"malformed stream reply: {e}"))
            self.reset(f"malformed stream reply: {e}", RESET_PROTOCOL)
            return
        if got is None:
            return
        reply, rest = got
        self._pending += rest
        self._reply.set_result(reply)

    def _on_data(self, data: bytes, fin: bool) -> None:
        self.bytes_in += len(data)
        if self._reply is not None and not self._reply.done():
            self._reply_data(data)
            if fin and not self._reply.done():
                self._reply.set_exception(TunnelError("stream ended before its reply"))
        elif self._sink is not None:
            if data:
                self._sink.stream_data(data)
        else:
            self._pending += data
        if fin:
            self.recv_done = True
            if self._sink is not None:
                self._sink.stream_eof()
            else:
                self._pending_eof = True
            self.conn._stream_maybe_done(self)

    def _on_abort(self, reason: str, *, recv_finished: bool = False) -> None:
        """The peer reset the stream or stopped reading, or the connection died."""
        if recv_finished:
            self.recv_done = True
        self._abort_quic(RESET_ABORTED)
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(TunnelError(reason))
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.stream_reset(reason)
        else:
            self._pending_reset = reason
        self.conn._stream_maybe_done(self)

    def _send(self, data: bytes, fin: bool) -> None:
        try:
            self.conn.quic.send_stream_data(self.id, data, end_stream=fin)
        except (ValueError, RuntimeError) as e:
            # The peer sent STOP_SENDING or the stream is gone: the abort event follows or
            # already happened; nothing more to send.
            self.conn.log.debug("stream send refused", stream=self.id, error=str(e))
            self.send_done = True
            return
        self.conn.transmit_soon()


class HeaderPhase:
    """Server side sink until the stream header is complete (decisions in `HeaderGate`)."""

    def __init__(self, stream: TunnelStream, handler: StreamHandler) -> None:
        self._stream = stream
        self._handler = handler
        self._gate = HeaderGate()

    def stream_data(self, data: bytes) -> None:
        self._decide(self._gate.feed(data))

    def stream_eof(self) -> None:
        self._decide(self._gate.eof())

    def _decide(self, outcome: HeaderAccepted | HeaderRefused | None) -> None:
        stream = self._stream
        match outcome:
            case None:
                pass
            case HeaderRefused(status, reason):
                stream.conn.counters["bad_headers"] += 1
                stream.conn.log.warning("tunnel stream refused", stream=stream.id, reason=reason)
                refuse(stream, status, reason)
            case HeaderAccepted(header, rest):
                stream._sink = None
                stream._pending += rest
                stream.hold_credit()
                self._handler(stream, header)
            case _:
                raise AssertionError(f"unknown header outcome {outcome!r}")

    def stream_reset(self, reason: str) -> None:
        pass

    def stream_writable(self) -> None:
        pass


def refuse(stream: TunnelStream, status: int, reason: str) -> None:
    """Answer a stream with an error reply and close it (we read no more of it)."""
    try:
        stream.write(encode_reply(StreamReply(status, reason[:1000])))
    except CodecError:
        stream.write(encode_reply(StreamReply(status, "refused")))
    stream.write_eof()
    if not stream.recv_done:
        stream.recv_done = True
        with contextlib.suppress(ValueError):
            stream.conn.quic.stop_stream(stream.id, RESET_PROTOCOL)
    stream._sink = None
    stream.conn._stream_maybe_done(stream)
