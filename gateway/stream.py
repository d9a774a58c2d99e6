"""One call through the QUIC tunnel: a bidirectional QUIC stream (`gateway.transport` has the
transport-neutral phases: pending bytes, the reply, the server's header phase).

Opener side: `TunnelStream.read_reply()` waits for the peer's `StreamReply` frame; the bytes
after it wait (within the flow-control window) until a `StreamSink` is attached. Server side:
`HeaderPhase` reads the `StreamHeader` frame and hands the stream to the `StreamHandler`, which
answers with `refuse()` or attaches a sink after its 200. Then bytes flow both ways with FIN
(half-close) propagated; `reset()` aborts both directions (RESET_STREAM + STOP_SENDING). The
connection driver (`gateway.tunnel`) feeds the events in; the stream sees it as a
`QuicStreamOwner`, not as the concrete class, so the two modules do not import each other.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

from gateway.quic_flow import TunnelQuicConnection
from gateway.transport import (
    RESET_ABORTED,
    RESET_PROTOCOL,
    BaseStream,
    HeaderPhase,
    SendMarks,
    StreamHandler,
    StreamSink,
)

__all__ = [
    "RESET_ABORTED",
    "RESET_PROTOCOL",
    "HeaderPhase",
    "QuicStreamOwner",
    "StreamHandler",
    "StreamSink",
    "TunnelStream",
    "refuse",
]


class QuicStreamOwner(Protocol):
    """What a `TunnelStream` needs of its connection (`gateway.tunnel.TunnelConnection`)."""

    quic: TunnelQuicConnection
    log: Any
    peer_cluster: str
    counters: dict[str, int]

    @property
    def settings(self) -> SendMarks: ...

    def transmit_soon(self) -> None: ...

    def stream_maybe_done(self, stream: TunnelStream) -> None: ...

    def watch(self, stream: TunnelStream) -> None: ...


class TunnelStream(BaseStream):
    """One call: a bidirectional QUIC stream of a `TunnelConnection`."""

    def __init__(self, conn: QuicStreamOwner, stream_id: int) -> None:
        super().__init__()
        self.conn = conn
        self.id = stream_id
        self._watching = False
        conn.quic.hold(stream_id)  # no sink yet: grant no credit beyond the initial window

    @property
    def log(self) -> Any:
        return self.conn.log

    @property
    def high_water(self) -> int:
        return self.conn.settings.send_high_water

    @property
    def peer_cluster(self) -> str:
        return self.conn.peer_cluster

    @property
    def counters(self) -> dict[str, int]:
        return self.conn.counters

    def _abort(self, code: int) -> None:
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

    def _stop_reading(self) -> None:
        if not self.recv_done:
            self.recv_done = True
            with contextlib.suppress(ValueError):
                self.conn.quic.stop_stream(self.id, RESET_PROTOCOL)

    def _maybe_done(self) -> None:
        self.conn.stream_maybe_done(self)

    def backlog(self) -> int:
        return self.conn.quic.send_backlog(self.id)

    def notify_writable(self) -> None:
        """Call `sink.stream_writable()` once the backlog is under the low-water mark."""
        if not self._watching:
            self._watching = True
            self.conn.watch(self)

    def hold_credit(self) -> None:
        self.conn.quic.hold(self.id)

    def release_credit(self) -> None:
        self.conn.quic.release(self.id)
        self.conn.transmit_soon()

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


def refuse(stream: BaseStream, status: int, reason: str) -> None:
    """Answer a stream with an error reply and close it (we read no more of it)."""
    stream.refuse(status, reason)
