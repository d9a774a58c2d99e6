"""Sidecar-to-sidecar multiplexing: many app connections as mux streams of one mTLS connection.

A pooled end-to-end mTLS connection between two sidecars (ALPN `fedgate-smux/1`) carries one
`mesh.mux` stream per application connection, as Istio ambient's ztunnel carries one HTTP/2
CONNECT stream per connection over pooled HBONE connections. A new app connection then costs
no TCP connect, no CONNECT and no handshake (issue 7). `sidecar.smux_pool` keeps the pool.

The TLS handshake and the peer's identity check happen exactly as for a per-connection call,
on a `sidecar.pipe.Conn` (`sidecar.dial.MeshDialer`, `Inbound._serve`); then `Conn.detach` hands
the socket and its `TlsSession` to a `SmuxConnection`, the thin driver here: TLS records in,
`mesh.mux` frames, events out to the streams.

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
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from mesh import mux
from mesh.naming import SpiffeId
from sidecar.http.flow import FlowConn
from sidecar.pipe import Conn
from sidecar.tlsio import TlsSession

ALPN = "fedgate-smux/1"
WINDOW = 1024 * 1024  # per-stream receive window: what a stream may have in flight
WRITE_HIGH_WATER = 512 * 1024
WRITE_LOW_WATER = 128 * 1024
SMALL_PIECE = 16 * 1024  # frame pieces below this are joined before TLS; larger go alone
RESET_ABORTED = 0x1  # the same values as gateway.transport's stream abort codes
RESET_PROTOCOL = 0x2

_log = structlog.get_logger("fedgate.sidecar")
_ids = itertools.count(1)


class StreamTransport(asyncio.Transport):
    """One mux stream as the transport of a `Conn` (see the module docstring)."""

    def __init__(self, conn: SmuxConnection, stream_id: int, protocol: Conn) -> None:
        super().__init__({"peername": conn.peername, "sockname": conn.sockname})
        self.conn = conn
        self.id = stream_id
        self.protocol = protocol
        self.send_done = False  # our FIN queued or a reset
        self.recv_done = False  # the peer's FIN delivered or a reset
        self.closing = False  # the protocol called close or abort
        self.lost = False  # connection_lost was delivered
        self._paused = False
        self._pending: deque[bytes] = deque()
        self._pending_fin = False
        self._writing_paused = False
        self._high = WRITE_HIGH_WATER
        self._low = WRITE_LOW_WATER

    # -- asyncio.Transport, as Conn uses it ----------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "smux_stream":
            return self.id
        return super().get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self.closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = WRITE_HIGH_WATER if high is None else high
        self._low = min(self._high, WRITE_LOW_WATER if low is None else low)

    def get_write_buffer_size(self) -> int:
        return self.conn.mux.backlog(self.id) + self.conn.write_backlog()

    def can_write_eof(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.send_done or not data:
            return
        self.conn.send(self, bytes(data), False)
        if self.get_write_buffer_size() > self._high:
            if not self._writing_paused:
                self._writing_paused = True
                self.conn.watch(self)
            # Told again on every write over the mark: a Conn paused before its splice (the
            # shared socket's buffer counts) had no peer to pause then, and would flood.
            self.protocol.pause_writing()

    def write_eof(self) -> None:
        if self.send_done:
            return
        self.send_done = True
        self.conn.send(self, b"", True)
        self._maybe_done()

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if self._pending or self._pending_fin:
                asyncio.get_running_loop().call_soon(self._deliver_pending)

    def is_reading(self) -> bool:
        return not self._paused

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.write_eof()
        # Unread bytes are dropped; the peer learns it with a reset once ours are out.
        self._pending.clear()
        if not self.recv_done:
            self.conn.watch(self)
            self.check_writable()
        self._lose(None)

    def abort(self) -> None:
        self.closing = True
        self._pending.clear()
        self.reset(RESET_ABORTED)
        self._lose(None)

    # -- the driver's side ---------------------------------------------------------------------

    def reset(self, code: int) -> None:
        if not (self.send_done and self.recv_done):
            self.send_done = self.recv_done = True
            self.conn.mux.reset_stream(self.id, code)
            self.conn.flush_soon()
        self._maybe_done()

    def received(self, data: bytes, fin: bool) -> None:
        if self.closing:  # the protocol is gone: keep the peer flowing until the reset
            self.conn.mux.consumed(self.id, len(data))
            if fin:
                self.recv_done = True
                self._maybe_done()
            return
        if self._paused or self._pending:
            if data:
                self._pending.append(data)
            self._pending_fin = self._pending_fin or fin
            return
        self._deliver(data, fin)

    def peer_reset(self, code: int) -> None:
        self.send_done = self.recv_done = True
        self._pending.clear()
        self._maybe_done()
        self._lose(ConnectionResetError(f"stream reset by peer (code {code})"))

    def failed(self, reason: str) -> None:
        """The connection closed under this stream."""
        self.send_done = self.recv_done = True
        self._pending.clear()
        self._lose(ConnectionResetError(f"smux connection closed: {reason}"))

    def check_writable(self) -> bool:
        """Resume a paused writer, or send the reset a close deferred; True: stop watching."""
        backlog = self.get_write_buffer_size()
        if self.closing:
            if self.recv_done:
                return True
            if backlog == 0:
                self.reset(RESET_ABORTED)
                return True
            return False
        if self._writing_paused and backlog <= self._low:
            self._writing_paused = False
            self.protocol.resume_writing()
        return not self._writing_paused

    # -- internals -----------------------------------------------------------------------------

    def _deliver(self, data: bytes, fin: bool) -> None:
        if data:
            self.conn.mux.consumed(self.id, len(data))
            self.conn.flush_soon()
            self.protocol.data_received(data)
        if fin and not self.recv_done and not self.closing:
            self.recv_done = True
            self.protocol.eof_received()
            self._maybe_done()

    def _deliver_pending(self) -> None:
        while self._pending and not self._paused and not self.closing:
            self._deliver(self._pending.popleft(), False)
        if self._pending_fin and not self._pending and not self._paused and not self.closing:
            self._pending_fin = False
            self._deliver(b"", True)

    def _maybe_done(self) -> None:
        if self.send_done and self.recv_done:
            self.conn.forget(self)

    def _lose(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self.closing = True
        asyncio.get_running_loop().call_soon(self.protocol.connection_lost, exc)


class SmuxConnection(asyncio.Protocol):
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
        self.is_client = is_client
        self.peer = peer
        self.max_streams = max_streams  # ours, and as a client at most what the server allows
        self.mux = mux.MuxConnection(is_client=is_client, window=WINDOW, max_streams=max_streams)
        self.id = f"m{next(_ids)}"
        self.log = log.bind(smux=self.id, peer=peer.uri)
        self.streams: dict[int, StreamTransport] = {}
        self.opened = 0  # streams over the connection's life
        self.created = time.monotonic()
        self.retiring = False
        self.close_reason = ""
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_closed: Callable[[SmuxConnection], None] = lambda conn: None
        self.peername: Any = None
        self.sockname: Any = None
        self.tls: TlsSession | None = None
        self._on_stream = on_stream
        self._idle_timeout = idle_timeout
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._flush_handle: asyncio.Handle | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._in_receive = False
        self._paused = False
        self._watched: set[StreamTransport] = set()

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

    def write_backlog(self) -> int:
        t = self._transport
        return t.get_write_buffer_size() if self._paused and t is not None else 0

    # -- setup -----------------------------------------------------------------------------------

    def adopt(self, conn: Conn) -> None:
        """Take over `conn`'s socket and finished TLS session (and what it buffered)."""
        if conn.error is not None or conn.eof or conn.closed.done():
            raise ConnectionError(f"{conn.label} closed before it could be multiplexed")
        transport, tls, pending = conn.detach()
        assert tls is not None, "adopt a connection after its handshake"
        self._transport, self.tls = transport, tls
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

    def retire(self) -> None:
        """Take no new streams; close once the open ones are done."""
        self.retiring = True
        if not self.streams:
            self.close("retired")

    def close(self, reason: str) -> None:
        """Tell the peer why (GOAWAY) and close; open streams are reset."""
        if self.closed.done():
            return
        self.close_reason = self.close_reason or reason
        self.mux.goaway(reason)
        self._flush()
        self._terminated(reason)

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        tls = self.tls
        if tls is None or self.closed.done():
            return
        try:
            tls.feed(data)
            chunks = tls.read()
        except ssl.SSLError as e:
            self._terminated(f"tls error: {e.reason or e}")
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

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._check_writable()

    # -- the streams' side -------------------------------------------------------------------------

    def send(self, stream: StreamTransport, data: bytes, fin: bool) -> None:
        try:
            self.mux.send_data(stream.id, data, fin)
        except mux.MuxError as e:  # reset meanwhile: the bytes have nowhere to go
            self.log.debug("stream send refused", stream=stream.id, error=str(e))
            return
        self.flush_soon()

    def watch(self, stream: StreamTransport) -> None:
        self._watched.add(stream)

    def forget(self, stream: StreamTransport) -> None:
        """`stream` is finished both ways (FINs or a reset)."""
        if self.streams.pop(stream.id, None) is None:
            return
        self._watched.discard(stream)
        if not self.streams:
            if self.retiring:
                self.close("retired")
            else:
                self._arm_idle()

    def flush_soon(self) -> None:
        if self._flush_handle is None and not self._in_receive and not self.closed.done():
            self._flush_handle = self._loop.call_soon(self._flush)

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

    def _process_events(self) -> None:
        while (event := self.mux.next_event()) is not None:
            match event:
                case mux.StreamData(stream_id, data, end_stream):
                    stream = self.streams.get(stream_id)
                    if stream is not None:
                        stream.received(data, end_stream)
                case mux.StreamOpened(stream_id):
                    self._accept(stream_id)
                case mux.StreamReset(stream_id, code):
                    stream = self.streams.get(stream_id)
                    if stream is not None:
                        stream.peer_reset(code)
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
                    return
                case mux.PingAcked():
                    pass
                case _:
                    raise AssertionError(f"unhandled mux event {event!r}")
        if self._watched:
            self._check_writable()

    def _accept(self, stream_id: int) -> None:
        if self._on_stream is None:
            self.mux.reset_stream(stream_id, mux.RESET_REFUSED)
            return
        conn = FlowConn("caller")  # the inbound may read it in Python (sidecar.inbound_gate)
        self._add(stream_id, conn)
        self._on_stream(conn)

    def _check_writable(self) -> None:
        for stream in list(self._watched):
            if stream.check_writable():
                self._watched.discard(stream)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        transport, tls = self._transport, self.tls
        if transport is None or tls is None or transport.is_closing():
            return
        # Payloads go to TLS as they are and their records to the socket one payload at a
        # time: joining every stream's frames first copied each byte once more and made
        # multi-MiB buffers (measured: ~+30% CPU per GB with 16 streams); small frames
        # (headers, WINDOW) are joined.
        small: list[bytes] = []
        try:
            for piece in self.mux.pieces_to_send():
                if len(piece) < SMALL_PIECE:
                    small.append(piece)
                    continue
                if small:
                    tls.send(b"".join(small))
                    small.clear()
                tls.send(piece)
                transport.write(tls.outgoing())
            if small:
                tls.send(b"".join(small))
        except ssl.SSLError as e:
            self._terminated(f"tls error: {e.reason or e}")
            return
        data = tls.outgoing()
        if data:
            transport.write(data)
        if self._watched:
            self._check_writable()

    def _arm_idle(self) -> None:
        if self._idle_timeout > 0 and self._idle_handle is None and not self.closed.done():
            self._idle_handle = self._loop.call_later(self._idle_timeout, self._idle)

    def _idle(self) -> None:
        self._idle_handle = None
        if not self.streams:
            self.close(f"idle for {self._idle_timeout:g} s")

    def _terminated(self, reason: str) -> None:
        if self.closed.done():
            return
        self.close_reason = self.close_reason or reason
        self.closed.set_result(None)
        for handle in (self._flush_handle, self._idle_handle):
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._idle_handle = None
        streams = list(self.streams.values())
        self.streams.clear()
        self._watched.clear()
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
