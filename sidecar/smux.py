"""Sidecar-to-sidecar multiplexing: many app connections as mux streams of one mTLS connection.

A pooled end-to-end mTLS connection between two sidecars (ALPN `fedgate-smux/1`) carries one
`mesh.mux` stream per application connection, as Istio ambient's ztunnel carries one HTTP/2
CONNECT stream per connection over pooled HBONE connections. A new app connection then costs
no TCP connect, no CONNECT and no handshake (issue 7). `sidecar.smux_pool` keeps the pool.

The TLS handshake and the peer's identity check happen exactly as for a per-connection call,
on a `sidecar.pipe.Conn` (`sidecar.dial.MeshDialer`, `Inbound._serve`); then `Conn.detach` hands
the socket and its `TlsSession` to a `SmuxConnection`, the thin driver here: TLS records in,
`mesh.mux` frames, events out to the streams. What it shares with the gateway's `tls`
transport (the stream table, the send side with its write batching, backpressure, the dispatch
of stream events, retire/close) is `mesh.muxconn.MuxDriver`'s; the streams are
`sidecar.smux_stream.StreamTransport`s.

Each stream is presented to the existing per-connection code as a `Conn` whose transport is a
`StreamTransport` (the few `asyncio.Transport` methods `Conn` calls), so the outbound's and the
inbound's handlers, `relay` and the HTTP tap run unchanged: the stream header, the stream
reply, half-close (mux FIN), resets (mux RESET) and backpressure mean what they mean on TCP:

* receive: bytes are passed to the `Conn` and reported consumed (the peer gets more credit,
  mux WINDOW) only while it reads; `pause_reading` holds them (at most the window) instead;
* send: `write` hands bytes to the mux, which keeps them until the peer grants credit; above
  `WRITE_HIGH_WATER` of backlog (credit wait plus the socket's full write buffer) the `Conn`
  gets `pause_writing`, below `WRITE_LOW_WATER` `resume_writing`;
* `close` ends our direction (FIN) and, if the peer's is still open, resets the stream once
  our bytes are out (as a TCP close with unread data does); `abort` resets it at once.

A protocol violation by the peer (garbage frames, credit overrun) closes that connection with a
logged reason ("smux connection failed") and resets its streams; other connections live on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import time
from collections.abc import Callable
from typing import Any

import structlog

from mesh import mux
from mesh.muxconn import MuxDriver
from mesh.naming import SpiffeId
from sidecar.http.flow import FlowConn
from sidecar.pipe import Conn
from sidecar.smux_stream import WRITE_HIGH_WATER, StreamTransport
from sidecar.tlsio import TlsSession

__all__ = ["ALPN", "WINDOW", "SmuxConnection", "StreamTransport", "refusal"]

ALPN = "fedgate-smux/1"
WINDOW = 1024 * 1024  # per-stream receive window: what a stream may have in flight

_log = structlog.get_logger("fedgate.sidecar")
_ids = itertools.count(1)


class SmuxConnection(MuxDriver[StreamTransport], asyncio.Protocol):
    """Drives one mTLS connection carrying mux streams, after its handshake (either side).

    `on_stream` (server side) is called with each stream the peer opens, as a `Conn`;
    `on_closed` once the connection is gone. `idle_timeout` (client side): close after that
    long without streams (`sidecar.smux_pool`)."""

    def __init__(
        self,
        *,
        is_client: bool,
        peer: SpiffeId,
        max_streams: int = 1024,
        idle_timeout: float = 0.0,
        on_stream: Callable[[Conn], None] | None = None,
        log: Any = _log,
    ) -> None:
        super().__init__(
            mux.MuxConnection(is_client=is_client, window=WINDOW, max_streams=max_streams)
        )
        self.is_client = is_client
        self.peer = peer
        self.max_streams = max_streams  # ours, and as a client at most what the server allows
        self.id = f"m{next(_ids)}"
        self.log = log.bind(smux=self.id, peer=peer.uri)
        self.opened = 0  # streams over the connection's life
        self.created = time.monotonic()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.on_closed: Callable[[SmuxConnection], None] = lambda conn: None
        self.peername: Any = None
        self.sockname: Any = None
        self.tls: TlsSession | None = None
        self._on_stream = on_stream
        self._idle_timeout = idle_timeout
        self._idle_handle: asyncio.TimerHandle | None = None

    # -- state -----------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Takes new streams: open, not draining, below its stream limit."""
        return (
            not self.closed.done()
            and not self.retiring
            and not self.mux.goaway_received
            and not self.mux.goaway_sent
            and self.mux.error is None
            and len(self.streams) < self.max_streams
        )

    @property
    def open_streams(self) -> int:
        return len(self.streams)

    # -- setup -----------------------------------------------------------------------------------

    def adopt(self, conn: Conn) -> None:
        """Take over `conn`'s socket and finished TLS session (and what it buffered)."""
        if conn.error is not None or conn.eof or conn.closed.done():
            raise ConnectionError(f"{conn.label} closed before it could be multiplexed")
        transport, tls, pending = conn.detach()
        assert tls is not None, "adopt a connection after its handshake"
        self._transport, self.tls = transport, tls
        self._records = (tls.obj.write, tls.outgoing)
        self.peername = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        transport.set_protocol(self)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if not self.is_client:
            self.mux.ready()  # tells the client how many streams it may open
        if pending:
            self._in_receive = True
            try:
                self.mux.receive_data(pending)
            finally:
                self._in_receive = False
            self._process_events()
        self._flush()
        self._arm_idle()
        transport.resume_reading()

    def open_stream(self, label: str) -> Conn:
        """A new stream, as a `Conn`; nothing is sent before its first write."""
        stream_id = self.mux.open_stream()  # MuxError if the connection takes none
        conn = Conn(label)
        self._add(stream_id, conn)
        return conn

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        tls = self.tls
        if tls is None or self.closed.done():
            return
        try:
            tls.feed(data)
            chunks = tls.read()
        except ssl.SSLError as e:
            self._terminated(self._tls_failure(e))
            return
        self._in_receive = True
        try:
            if chunks:
                # One parse and one write to each stream's peer per batch, not per 16 KiB
                # TLS record (as gateway.tls_tunnel does): one copy costs less than the calls.
                self.mux.receive_data(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        finally:
            self._in_receive = False
        self._process_events()
        if tls.read_closed and not self.closed.done():
            self._terminated(self.close_reason or "peer closed the connection")
            return
        self._flush()

    def eof_received(self) -> bool:
        self._terminated(self.close_reason or "peer closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._terminated(f"connection lost: {exc}" if exc else "connection closed by peer")

    # -- internals ---------------------------------------------------------------------------------

    def _add(self, stream_id: int, conn: Conn) -> StreamTransport:
        stream = StreamTransport(self, stream_id, conn)
        self.streams[stream_id] = stream
        self.opened += 1
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        conn.connection_made(stream)
        return stream

    def _on_event(self, event: mux.Event) -> bool:
        match event:
            case mux.PeerReady(max_streams):
                if self.is_client:
                    self.max_streams = min(self.max_streams, max_streams)
            case mux.GoAway(_, reason):
                self.log.info("smux peer going away", reason=reason)
                # Why the streams fail if the peer closes next (a refusal, a revocation).
                self.close_reason = self.close_reason or f"peer going away: {reason}"
                self.retire()
            case mux.ConnectionFailed(reason):
                self.log.warning("smux connection failed", reason=f"protocol error: {reason}")
                self._flush()
                self._terminated(f"protocol error: {reason}")
                return True
            case mux.PingAcked():
                pass
            case _:
                raise AssertionError(f"unhandled mux event {event!r}")
        return False

    def _accept(self, stream_id: int) -> None:
        if self._on_stream is None:
            self.mux.reset_stream(stream_id, mux.RESET_REFUSED)
            return
        conn = FlowConn("caller")  # the inbound may read it in Python (sidecar.inbound_gate)
        self._add(stream_id, conn)
        self._on_stream(conn)

    def _idle(self) -> None:
        if self.retiring:
            self.close("retired")
        else:
            self._arm_idle()

    def _arm_idle(self) -> None:
        if self._idle_timeout > 0 and self._idle_handle is None and not self.closed.done():
            self._idle_handle = self._loop.call_later(self._idle_timeout, self._idle_timer)

    def _idle_timer(self) -> None:
        self._idle_handle = None
        if not self.streams:
            self.close(f"idle for {self._idle_timeout:g} s")

    def _terminated(self, reason: str) -> None:
        if self.closed.done():
            return
        streams = self._end(reason)
        self.closed.set_result(None)
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        for stream in streams:
            stream.failed(self.close_reason)
        self.log.info("smux connection closed", reason=self.close_reason, streams=self.opened)
        transport, tls = self._transport, self.tls
        if transport is not None and not transport.is_closing():
            if tls is not None:
                with contextlib.suppress(ssl.SSLError):
                    tls.close_write()
                    data = tls.outgoing()
                    if data:
                        transport.write(data)
            transport.close()
        self.on_closed(self)


def refusal(reason: str) -> bytes:
    """The GOAWAY that refuses a multiplexing caller before any stream (sidecar.inbound)."""
    frames = mux.MuxConnection(is_client=False)
    frames.goaway(f"refused: {reason}")
    return frames.data_to_send()
