"""One smux stream as the transport of a `sidecar.pipe.Conn` (`StreamTransport`): the few
`asyncio.Transport` methods `Conn` calls, on a stream of a `sidecar.smux.SmuxConnection`, with
TCP's meaning for half-close, resets and backpressure (the rules are in `sidecar.smux`'s
docstring). The stream sees its connection as an `SmuxOwner`, not as the concrete class.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Protocol

from mesh import mux
from sidecar.pipe import Conn

WRITE_HIGH_WATER = 512 * 1024
WRITE_LOW_WATER = 128 * 1024
RESET_ABORTED = 0x1  # the same values as gateway.transport's stream abort codes


class SmuxOwner(Protocol):
    """What a `StreamTransport` needs of its connection (`SmuxConnection`)."""

    mux: mux.MuxConnection
    log: Any
    peername: Any
    sockname: Any

    def send(self, stream_id: int, data: bytes, fin: bool) -> bool: ...

    def flush_soon(self) -> None: ...

    def write_backlog(self) -> int: ...

    def watch(self, stream: StreamTransport) -> None: ...

    def forget(self, stream: StreamTransport) -> None: ...


class StreamTransport(asyncio.Transport):
    """One mux stream as the transport of a `Conn` (see the module docstring)."""

    def __init__(self, conn: SmuxOwner, stream_id: int, protocol: Conn) -> None:
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
        self._send(bytes(data), False)
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
        self._send(b"", True)
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

    def reset(self, code: int) -> None:
        if not (self.send_done and self.recv_done):
            self.send_done = self.recv_done = True
            self.conn.mux.reset_stream(self.id, code)
            self.conn.flush_soon()
        self._maybe_done()

    # -- the driver's side (`mesh.muxconn.DrivenStream`) -----------------------------------------

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

    def _send(self, data: bytes, fin: bool) -> None:
        if not self.conn.send(self.id, data, fin):  # reset meanwhile: nowhere to go
            self.conn.log.debug("stream send refused", stream=self.id)

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
