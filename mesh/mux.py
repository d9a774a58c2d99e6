"""Stream multiplexing inside one TLS connection (sans-I/O: bytes in, events
and bytes out; no sockets, no clock). The `tls` transport's driver is `gateway.tls_tunnel`.

Why not HTTP/2 CONNECT (Istio's HBONE): the gateway needs only what yamux or HTTP/2 DATA
frames give, and a pure-Python HPACK/HTTP/2 stack costs far more per frame than a fixed
10-byte header (docs/transports.md has the figures). The stream header that names the
destination travels as the first bytes of each stream, exactly as on QUIC.

Frame: `type:u8 flags:u8 stream:u32 value:u32` (big-endian), then, for DATA and GOAWAY only,
`value` bytes of payload.

| type | name   | stream | value                    | payload     | meaning                        |
|------|--------|--------|--------------------------|-------------|--------------------------------|
| 0    | DATA   | > 0    | payload length           | bytes       | flag FIN=1: last frame         |
| 1    | WINDOW | > 0    | credit increment         | none        | the sender may send more       |
| 2    | RESET  | > 0    | error code               | none        | abort both directions          |
| 3    | PING   | 0      | opaque                   | none        | flag ACK=1 answers a PING      |
| 4    | GOAWAY | last   | reason length (<= 1024)  | UTF-8 text  | no new streams; then close     |
| 5    | READY  | 0      | max concurrent streams   | none        | server accepted the peer       |

Rules (a violation is a connection error: GOAWAY with the reason, then close):
* Clients open odd stream ids, servers even, each strictly increasing; the first DATA frame on
  an unknown id of the peer's parity above the last one opens a stream. Frames for ids that
  are not open (finished or reset streams) are ignored: their payload is discarded.
* Flow control is per stream (RFC 9113 §5.2 style, without a connection window: the number of
  streams and the window bound the buffering). Each direction of a stream starts with
  `INITIAL_WINDOW` of credit; the receiver raises it with WINDOW as its application consumes
  (`consumed`), up to its configured window. DATA beyond the credit is a connection error.
* A stream is finished once FIN was sent and received, or a RESET was sent or received.
* After GOAWAY (sent or received) no new stream is opened on the connection; a peer stream
  opened after our GOAWAY, or above `max_streams`, is answered with RESET(REFUSED).
* Unknown frame types are connection errors (the ALPN names this protocol's version).
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

FRAME = struct.Struct("!BBII")
DATA, WINDOW, RESET, PING, GOAWAY, READY = range(6)
FLAG_FIN = 0x1
FLAG_ACK = 0x1
INITIAL_WINDOW = 256 * 1024
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1
MAX_GOAWAY = 1024
# RESET codes beyond gateway.transport's RESET_ABORTED / RESET_PROTOCOL.
RESET_REFUSED = 0x3


@dataclass(frozen=True, slots=True)
class StreamOpened:
    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamData:
    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class PeerReady:
    max_streams: int


@dataclass(frozen=True, slots=True)
class PingAcked:
    value: int


@dataclass(frozen=True, slots=True)
class GoAway:
    last_stream_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The peer broke the protocol; the connection must close (our GOAWAY is queued)."""

    reason: str


Event = StreamOpened | StreamData | StreamReset | PeerReady | PingAcked | GoAway | ConnectionFailed


class _Stream:
    __slots__ = (
        "fin_queued",
        "fin_recv",
        "fin_sent",
        "first_sent",
        "recv_credit",
        "send_buf",
        "send_buffered",
        "send_credit",
        "unacked",
    )

    def __init__(self, recv_credit: int) -> None:
        self.send_credit = INITIAL_WINDOW
        self.recv_credit = recv_credit  # what the peer may still send
        self.send_buf: deque[bytes] = deque()
        self.send_buffered = 0
        self.fin_queued = False
        self.fin_sent = False
        self.fin_recv = False
        self.unacked = 0
        self.first_sent = False


class MuxError(Exception):
    """A local misuse: sending on a stream that is not open."""


class MuxConnection:
    """One end of a multiplexed connection (see the module docstring)."""

    def __init__(self, *, is_client: bool, window: int = INITIAL_WINDOW, max_streams: int = 1024):
        self.is_client = is_client
        self.window = min(max(window, INITIAL_WINDOW), MAX_WINDOW)
        self.max_streams = max_streams
        self.error: str | None = None
        self.goaway_sent = False
        self.goaway_received = False
        self._streams: dict[int, _Stream] = {}
        self._peer_open = 0
        self._next_local = 1 if is_client else 2
        self._last_peer = 0
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self._head = bytearray()
        self._left = 0  # payload bytes still to come for the current frame
        self._target = 0  # stream of the current DATA payload; 0: discard; -1: GOAWAY text
        self._fin = False
        self._goaway = bytearray()
        self._goaway_id = 0

    # --- state ------------------------------------------------------------------------------

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def backlog(self, stream_id: int) -> int:
        st = self._streams.get(stream_id)
        return st.send_buffered if st is not None else 0

    def open_streams(self) -> int:
        return len(self._streams)

    # --- commands -----------------------------------------------------------------------------

    def open_stream(self) -> int:
        if self.error is not None or self.goaway_sent or self.goaway_received:
            raise MuxError("connection takes no new streams")
        stream_id = self._next_local
        if stream_id > MAX_STREAM_ID:
            raise MuxError("stream ids exhausted")
        self._next_local += 2
        self._streams[stream_id] = _Stream(INITIAL_WINDOW)
        return stream_id

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        st = self._streams.get(stream_id)
        if st is None or st.fin_queued:
            raise MuxError(f"stream {stream_id} is not open for sending")
        if not st.send_buf and len(data) <= st.send_credit:
            st.send_credit -= len(data)
            if end_stream:
                st.fin_queued = True
            self._emit_data(stream_id, st, data, end_stream)
            return
        if data:
            st.send_buf.append(data)
            st.send_buffered += len(data)
        if end_stream:
            st.fin_queued = True
        self._drain(stream_id, st)

    def reset_stream(self, stream_id: int, code: int) -> None:
        st = self._streams.pop(stream_id, None)
        if st is None:
            return
        self._closed(stream_id)
        self._out.append(FRAME.pack(RESET, 0, stream_id, code))

    def consumed(self, stream_id: int, n: int) -> None:
        """The application took `n` bytes of the stream: the peer may send that much more."""
        st = self._streams.get(stream_id)
        if st is None or st.fin_recv or n <= 0:
            return
        st.unacked += n
        if st.unacked >= self.window // 4:
            st.recv_credit += st.unacked
            self._out.append(FRAME.pack(WINDOW, 0, stream_id, st.unacked))
            st.unacked = 0

    def ping(self, value: int) -> None:
        self._out.append(FRAME.pack(PING, 0, 0, value & 0xFFFFFFFF))

    def ready(self) -> None:
        self._out.append(FRAME.pack(READY, 0, 0, self.max_streams))

    def goaway(self, reason: str) -> None:
        """Open no new stream, refuse the peer's new ones; existing streams go on."""
        if self.goaway_sent:
            return
        self.goaway_sent = True
        text = reason.encode("utf-8", "replace")[:MAX_GOAWAY]
        self._out.append(FRAME.pack(GOAWAY, 0, self._last_peer, len(text)) + text)

    # --- input --------------------------------------------------------------------------------

    def receive_data(self, data: bytes | memoryview) -> None:
        """Parse what arrived. `data` may be a view of a buffer the caller reuses: payloads
        reach the events as `bytes` copied out of it (one copy; none when `data` is `bytes`
        and a payload spans all of it)."""
        if self.error is not None:
            return
        pos, end = 0, len(data)
        while pos < end and self.error is None:
            if self._left:
                take = min(self._left, end - pos)
                chunk = data if take == end else data[pos : pos + take]
                pos += take
                self._left -= take
                self._payload(chunk)
                continue
            need = FRAME.size - len(self._head)
            if need == FRAME.size and end - pos >= FRAME.size:
                ftype, flags, sid, value = FRAME.unpack_from(data, pos)
                pos += FRAME.size
            else:
                self._head += data[pos : pos + need]
                pos += min(need, end - pos)
                if len(self._head) < FRAME.size:
                    break
                ftype, flags, sid, value = FRAME.unpack(self._head)
                self._head.clear()
            self._frame(ftype, flags, sid, value)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def pieces_to_send(self) -> list[bytes]:
        """What `data_to_send` would return, as the pieces it would join (frame headers and
        payloads as given to `send_data`): a driver that encrypts can take large payloads
        without copying them into one buffer first."""
        out, self._out = self._out, []
        return out

    # --- internals ----------------------------------------------------------------------------

    def _frame(self, ftype: int, flags: int, sid: int, value: int) -> None:
        if ftype == DATA:
            self._data_frame(flags, sid, value)
        elif ftype == WINDOW:
            st = self._streams.get(sid)
            if sid == 0 or value == 0:
                self._fail(f"WINDOW frame for stream {sid} with increment {value}")
            elif st is not None:
                st.send_credit += value
                if st.send_credit > MAX_WINDOW:
                    self._fail(f"stream {sid} window overflow")
                else:
                    self._drain(sid, st)
        elif ftype == RESET:
            if sid == 0:
                self._fail("RESET frame for stream 0")
            elif self._streams.pop(sid, None) is not None:
                self._closed(sid)
                self._events.append(StreamReset(sid, value))
        elif ftype == PING:
            if flags & FLAG_ACK:
                self._events.append(PingAcked(value))
            else:
                self._out.append(FRAME.pack(PING, FLAG_ACK, 0, value))
        elif ftype == GOAWAY:
            if value > MAX_GOAWAY:
                self._fail(f"GOAWAY reason of {value} bytes")
                return
            self._goaway.clear()
            self._goaway_id = sid
            self._target = -1
            self._left = value
            if value == 0:
                self._payload(b"")
        elif ftype == READY:
            self._events.append(PeerReady(value))
        else:
            self._fail(f"unknown frame type {ftype}")

    def _data_frame(self, flags: int, sid: int, length: int) -> None:
        fin = bool(flags & FLAG_FIN)
        st = self._streams.get(sid)
        target = sid
        if st is None:
            target = 0  # discard: a finished stream's late data, unless it opens a new one
            if sid == 0:
                self._fail("DATA frame on stream 0")
                return
            if (sid & 1) != (0 if self.is_client else 1):
                if sid >= self._next_local:
                    self._fail(f"DATA on stream {sid}, which we never opened")
                    return
            elif sid > self._last_peer:
                self._last_peer = sid
                if self.goaway_sent or self._peer_open >= self.max_streams:
                    self._out.append(FRAME.pack(RESET, 0, sid, RESET_REFUSED))
                else:
                    st = self._streams[sid] = _Stream(self.window)
                    self._peer_open += 1
                    target = sid
                    self._events.append(StreamOpened(sid))
                    if self.window > INITIAL_WINDOW:
                        extra = self.window - INITIAL_WINDOW
                        self._out.append(FRAME.pack(WINDOW, 0, sid, extra))
        if st is not None:
            if st.fin_recv:
                self._fail(f"DATA on stream {sid} after its FIN")
                return
            if length > st.recv_credit:
                self._fail(f"stream {sid} sent {length} bytes beyond its window")
                return
            st.recv_credit -= length
        self._target = target
        self._fin = fin
        self._left = length
        if length == 0:
            self._payload(b"")

    def _payload(self, chunk: bytes | memoryview) -> None:
        target = self._target
        if target == -1:
            self._goaway += chunk
            if not self._left:
                self.goaway_received = True
                reason = self._goaway.decode("utf-8", "replace")
                self._events.append(GoAway(self._goaway_id, reason))
            return
        if target == 0:
            return
        fin = self._fin and not self._left
        if not chunk and not fin:
            return
        self._events.append(StreamData(target, bytes(chunk), fin))
        if fin:
            st = self._streams.get(target)
            if st is not None:
                st.fin_recv = True
                self._maybe_finished(target, st)

    def _emit_data(self, sid: int, st: _Stream, data: bytes, fin: bool) -> None:
        self._out.append(FRAME.pack(DATA, FLAG_FIN if fin else 0, sid, len(data)))
        if data:
            self._out.append(data)
        if not st.first_sent:
            st.first_sent = True
            if (sid & 1) == (1 if self.is_client else 0) and self.window > INITIAL_WINDOW:
                # Our own stream is known to the peer now: grant the rest of our window.
                self._out.append(FRAME.pack(WINDOW, 0, sid, self.window - INITIAL_WINDOW))
                st.recv_credit = self.window
        if fin:
            st.fin_sent = True
            self._maybe_finished(sid, st)

    def _drain(self, sid: int, st: _Stream) -> None:
        while st.send_buf and st.send_credit > 0:
            chunk = st.send_buf.popleft()
            if len(chunk) > st.send_credit:
                st.send_buf.appendleft(chunk[st.send_credit :])
                chunk = chunk[: st.send_credit]
            st.send_credit -= len(chunk)
            st.send_buffered -= len(chunk)
            last = st.fin_queued and not st.send_buf
            self._emit_data(sid, st, chunk, last)
            if last:
                return
        if st.fin_queued and not st.send_buf and not st.fin_sent:
            self._emit_data(sid, st, b"", True)

    def _maybe_finished(self, sid: int, st: _Stream) -> None:
        if st.fin_sent and st.fin_recv and self._streams.pop(sid, None) is not None:
            self._closed(sid)

    def _closed(self, sid: int) -> None:
        if (sid & 1) != (1 if self.is_client else 0):
            self._peer_open -= 1

    def _fail(self, reason: str) -> None:
        self.error = reason
        self._left = 0
        if not self.goaway_sent:
            self.goaway(f"protocol error: {reason}")
        self._events.append(ConnectionFailed(reason))
