"""Relay between one TCP connection and one tunnel stream (any transport), as an
`asyncio.Protocol`.

Bytes are moved as they come (no per-chunk work beyond the transport's own); FIN is propagated
in both directions (half-close), and the TCP connection closes once both directions ended. An
error on either side aborts the other: a TCP reset becomes a stream reset (QUIC RESET_STREAM +
STOP_SENDING, mux RESET, TCP RST), a stream reset or a lost tunnel connection aborts the TCP
connection.

Backpressure both ways: TCP reads pause while the stream's send backlog is above the high-water
mark; the stream's receive credit is held while the TCP write buffer is above its own
(`pause_writing`). Nothing here buffers on its own.

When the stream is itself a plain TCP connection (`passthrough`), once routed the two sockets
are handed to `gateway.zerocopy` (os.splice, no byte through Python); the `Splice` object stays
the call's handle (`abort`, `on_done`) until the relay ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from typing import Any, cast

from gateway import zerocopy
from gateway.transport import RESET_ABORTED, Stream

HANDOFF_WAIT = 2.0  # seconds to wait for write buffers to drain before zero-copy relaying


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Splice(asyncio.Protocol):
    """TCP side of a relay.

    Given a `stream`, relaying starts as soon as the TCP connection is made, after `preamble`
    is written to the stream (the ingress's 200 reply must precede the endpoint's first byte).
    Without one, the owner calls `start` later (the egress, once its CONNECT is routed).
    """

    def __init__(
        self,
        stream: Stream | None = None,
        *,
        preamble: bytes = b"",
        on_done: Callable[[Splice, str], None] | None = None,
    ) -> None:
        self.stream = stream
        self._preamble = preamble
        self.transport: asyncio.Transport | None = None
        self._on_done = on_done
        self._tcp_eof = False  # FIN received from TCP (sent on the stream)
        self._stream_eof = False  # FIN received from the stream (sent on TCP)
        self._finished = False
        self._reading_paused = False
        self.relay: zerocopy.SocketRelay | None = None
        self._handing_off = False

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, stream: Stream) -> None:
        """Begin relaying: deliver what the stream already holds, then everything else."""
        self.stream = stream
        stream.attach(self)

    def _finish(self, outcome: str) -> None:
        if self._finished:
            return
        self._finished = True
        if self._on_done is not None:
            self._on_done(self, outcome)

    # --- asyncio.Protocol (TCP side) -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        set_nodelay(transport)
        if self.stream is not None:
            self.stream.write(self._preamble)
            self.start(self.stream)
            self.zero_copy()

    def data_received(self, data: bytes) -> None:
        stream = self.stream
        if stream is None:
            return
        stream.write(data)
        if stream.backlog() > stream.high_water and not self._reading_paused:
            self._reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
            stream.notify_writable()

    def eof_received(self) -> bool:
        self._tcp_eof = True
        if self.stream is not None:
            self.stream.write_eof()
        self._maybe_close()
        return True  # keep the transport open: the other direction may still be flowing

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handing_off:
            return  # the socket lives on in the relay
        stream = self.stream
        if stream is not None and not (stream.send_done and stream.recv_done):
            reason = f"tcp connection lost: {exc}" if exc else "tcp connection closed early"
            stream.reset(reason, RESET_ABORTED)
            self._finish(reason)
        else:
            self._finish("ok")

    def pause_writing(self) -> None:
        if self.stream is not None:
            self.stream.hold_credit()

    def resume_writing(self) -> None:
        if self.stream is not None:
            self.stream.release_credit()

    # --- StreamSink (tunnel side) ---------------------------------------------------------------

    def stream_data(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def stream_eof(self) -> None:
        self._stream_eof = True
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()
        self._maybe_close()

    def stream_reset(self, reason: str) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._finish(reason)

    def stream_writable(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    # --- zero copy -------------------------------------------------------------------------------

    def zero_copy(self) -> bool:
        """When the stream is a plain TCP connection too (`passthrough`), hand both sockets
        to `gateway.zerocopy` once the buffers are flushed. Returns False (nothing changed)
        when it does not apply; reading is then the caller's business."""
        stream: Any = self.stream
        t = self.transport
        if (
            not getattr(stream, "zero_copy", False)
            or not zerocopy.available()
            or t is None
            or t.is_closing()
            or self._finished
            or (self._tcp_eof and self._stream_eof)
        ):
            return False
        t.pause_reading()
        stream.hold_credit()
        loop = asyncio.get_running_loop()
        self._handoff_step(loop.time() + HANDOFF_WAIT)
        return True

    def _handoff_step(self, deadline: float) -> None:
        stream: Any = self.stream
        t = self.transport
        assert t is not None
        if self._finished or t.is_closing() or stream.transport.is_closing():
            return  # ended meanwhile (reset): connection_lost does the rest
        loop = asyncio.get_running_loop()
        if t.get_write_buffer_size() or stream.transport.get_write_buffer_size():
            if loop.time() < deadline:
                loop.call_later(0.001, self._handoff_step, deadline)
            else:  # keep copying: correct, only slower
                t.resume_reading()
                stream.release_credit()
            return
        tcp_fd = os.dup(t.get_extra_info("socket").fileno())
        peer_fd = stream.detach_socket()
        self._handing_off = True
        t.close()
        self.relay = zerocopy.SocketRelay(
            tcp_fd,
            peer_fd,
            self._relay_done,
            a_ended=self._tcp_eof,
            b_ended=self._stream_eof,
        )
        stream.relay = self.relay
        self.relay.start()

    def _relay_done(self, outcome: str, sent: int, received: int) -> None:
        stream: Any = self.stream
        stream.relay_finished(outcome, sent, received)
        self._finish(outcome)

    def abort(self, reason: str) -> None:
        """Reset both sides (gateway shutdown)."""
        if self.relay is not None:
            self.relay.fail(reason)
        elif self.transport is not None:
            self.transport.abort()

    def _maybe_close(self) -> None:
        if self._tcp_eof and self._stream_eof and self.transport is not None:
            self.transport.close()  # flushes what is buffered first
