"""A gRPC client connection over HTTP/2, sans I/O: the `h2` state machine plus gRPC framing.

Feed it the bytes read from the socket and `now`; take events (`MessageReceived`, `CallEnded`)
and the bytes to write. One instance is one HTTP/2 connection carrying any number of calls
(streams), each a gRPC call of any shape (unary is a stream with one message each way). The
asyncio driver is `ca.h2grpc`; this module does no I/O and reads no clock.

What it keeps to, from gRPC's doc/PROTOCOL-HTTP2.md:
- requests: `POST`, `content-type: application/grpc`, `te: trailers`; messages length-prefixed
  (`mesh.grpcwire`), uncompressed;
- the status is `grpc-status`/`grpc-message` in the trailers (or a Trailers-Only response);
  a non-200 `:status` maps as doc/http-grpc-status-mapping.md; a stream reset is CANCELLED
  (CANCEL) or UNAVAILABLE (REFUSED_STREAM) or INTERNAL;
- a message larger than `max_message` ends the call RESOURCE_EXHAUSTED, read from its prefix
  before it is buffered (grpcio's `max_receive_message_length`);
- keepalive: a PING every `keepalive_interval` s, data or not, and the connection counts as
  dead when its ACK is `keepalive_timeout` s late. The interval must respect the server's
  `grpc.http2.min_ping_interval_without_data_ms` (10 s on the controller, `federation.server`)
  or the server answers GOAWAY `too_many_pings`.
- GOAWAY: no new calls; the calls the server says it will finish (id <= last_stream_id) run on,
  the others end UNAVAILABLE. A connection that ends ends every call UNAVAILABLE.

Receive flow control doubles as the bound on buffered messages: a stream's window is opened
again only once the messages already decoded have been taken (`delivered`), so a slow reader
stops the sender instead of growing a queue.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import Frame, GoAwayFrame

from mesh import grpcwire

WINDOW = 1 << 20  # per-stream and connection receive window: a large snapshot is not 64 KiB
KEEPALIVE_INTERVAL = 30.0
KEEPALIVE_TIMEOUT = 10.0
USER_AGENT = "fedgate-h2grpc/1"


class _H2Connection(h2.connection.H2Connection):
    """h2 closes the connection on any GOAWAY and then refuses every frame that follows, but
    RFC 9113 §6.8 lets the streams up to the GOAWAY's last stream id finish, and grpcio's
    graceful shutdown (`server.stop(grace)`) relies on it: GOAWAY, a PING, then the open calls
    run out their grace. So the connection stays open here and `GrpcClientConnection` decides
    (`closing` keeps new calls off it; an error GOAWAY ends it). Otherwise a frame right behind
    the GOAWAY in the same read raises, and the GOAWAY's reason (e.g. `too_many_pings`) is lost
    to a protocol error."""

    def _receive_goaway_frame(
        self, frame: GoAwayFrame
    ) -> tuple[list[Frame], list[h2.events.Event]]:
        frames, events = super()._receive_goaway_frame(frame)
        self.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        return frames, events


@dataclass(frozen=True, slots=True)
class MessageReceived:
    stream_id: int
    message: bytes


@dataclass(frozen=True, slots=True)
class CallEnded:
    """The call's status: `code` 0 is OK; every call ends with exactly one of these."""

    stream_id: int
    code: int
    details: str


Event = MessageReceived | CallEnded


class ConnectionClosedError(Exception):
    """A call started on a connection that has ended or received GOAWAY."""


@dataclass(slots=True)
class _Call:
    reader: grpcwire.MessageReader
    outbound: bytearray = field(default_factory=bytearray)
    end_after: bool = False  # half-close once `outbound` is flushed
    waiting: int = 0  # messages handed out but not yet `delivered`
    unacked: int = 0  # flow-controlled bytes received and not yet given back
    headers_seen: bool = False


class GrpcClientConnection:
    def __init__(
        self,
        authority: str,
        *,
        scheme: str = "https",
        max_message: int = 4 * 1024 * 1024,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
    ) -> None:
        self._authority = authority
        self._scheme = scheme
        self._max = max_message
        self._interval = keepalive_interval
        self._timeout = keepalive_timeout
        self._h2 = _H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self._calls: dict[int, _Call] = {}
        self._events: list[Event] = []
        self._next_ping = 0.0
        self._ping_sent: float | None = None
        self.pings = 0  # keepalive pings sent
        self.closing = False  # GOAWAY received (or sent): no new calls
        self.closed_reason = ""  # set once the connection is over

    # --- lifecycle ---------------------------------------------------------------------------

    def initiate(self, now: float) -> None:
        self._h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(WINDOW - 65535)
        self._next_ping = now + self._interval

    def connection_lost(self, reason: str) -> None:
        """The transport is gone: every call ends UNAVAILABLE."""
        self._end_all(reason)

    def close(self) -> None:
        """Send GOAWAY (the driver closes the socket after flushing)."""
        if not self.closed_reason:
            self.closing = True
            self._h2.close_connection()

    # --- calls -------------------------------------------------------------------------------

    def start_call(self, path: str, metadata: tuple[tuple[str, str], ...] = ()) -> int:
        if self.closing or self.closed_reason:
            raise ConnectionClosedError(self.closed_reason or "connection is going away")
        stream_id = self._h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", self._scheme),
            (":path", path),
            (":authority", self._authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", USER_AGENT),
            *metadata,
        ]
        self._h2.send_headers(stream_id, headers)
        self._calls[stream_id] = _Call(grpcwire.MessageReader(self._max))
        return stream_id

    def send_message(self, stream_id: int, message: bytes, end: bool = False) -> None:
        """Queue `message` (and a half-close with `end`); sent as flow control allows."""
        call = self._calls.get(stream_id)
        if call is None or call.end_after:
            raise ConnectionClosedError(f"call {stream_id} has ended")
        call.outbound += grpcwire.frame(message)
        call.end_after = end
        self._flush(stream_id)

    def cancel(self, stream_id: int) -> None:
        """RST_STREAM CANCEL (gRPC's client cancellation); no `CallEnded` follows."""
        if self._calls.pop(stream_id, None) is None or self.closed_reason:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)

    def delivered(self, stream_id: int) -> None:
        """One message of `stream_id` was taken by its reader; reopen the window once all are."""
        call = self._calls.get(stream_id)
        if call is None:
            return
        call.waiting -= 1
        self._give_back(stream_id, call)

    @property
    def active_calls(self) -> int:
        return len(self._calls)

    # --- I/O in and out ----------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self._h2.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            self._end_all(f"HTTP/2 protocol error: {e}")
            return
        for event in events:
            self._handle(event, now)

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    def next_event(self) -> Event | None:
        return self._events.pop(0) if self._events else None

    def get_timer(self) -> float | None:
        if self.closed_reason:
            return None
        if self._ping_sent is not None:
            return self._ping_sent + self._timeout
        return self._next_ping

    def handle_timer(self, now: float) -> None:
        if self.closed_reason:
            return
        if self._ping_sent is not None:
            if now >= self._ping_sent + self._timeout:
                self._h2.close_connection()
                self._end_all(f"keepalive ping not answered in {self._timeout:g} s")
            return
        if now >= self._next_ping:
            self.pings += 1
            self._h2.ping(self.pings.to_bytes(8, "big"))
            self._ping_sent = now

    # --- internals ---------------------------------------------------------------------------

    def _handle(self, event: h2.events.Event, now: float) -> None:
        match event:
            case h2.events.ResponseReceived(stream_id=sid, headers=headers):
                self._headers(sid, _fields(headers), trailers=False)
            case h2.events.TrailersReceived(stream_id=sid, headers=headers):
                self._headers(sid, _fields(headers), trailers=True)
            case h2.events.DataReceived(stream_id=sid, data=data, flow_controlled_length=n):
                self._data(sid, data, n)
            case h2.events.StreamEnded(stream_id=sid):
                # Ended without a status (trailers end a call first, and remove it).
                self._end(sid, grpcwire.INTERNAL, "stream ended without grpc-status")
            case h2.events.StreamReset(stream_id=sid, error_code=code):
                self._end(sid, _reset_code(code), f"stream reset by the server: {code!r}")
            case h2.events.ConnectionTerminated(
                error_code=code, last_stream_id=last, additional_data=extra
            ):
                self.closing = True
                why = f"GOAWAY {code!r}" + (f" ({extra.decode(errors='replace')})" if extra else "")
                for sid in [s for s in self._calls if s > (last or 0)]:
                    self._end(sid, grpcwire.UNAVAILABLE, why)
                if code != h2.errors.ErrorCodes.NO_ERROR:
                    self._end_all(why)
            case h2.events.PingAckReceived():
                self._ping_sent = None
                self._next_ping = now + self._interval
            case h2.events.WindowUpdated(stream_id=sid):
                for s in list(self._calls) if sid == 0 else [sid]:
                    self._flush(s)
            case (
                h2.events.RemoteSettingsChanged()
                | h2.events.SettingsAcknowledged()
                | h2.events.PingReceived()  # h2 answers it
                | h2.events.PriorityUpdated()
                | h2.events.UnknownFrameReceived()
            ):
                pass
            case _:
                # Anything else (a push, an informational response) a gRPC server never sends.
                pass

    def _headers(self, sid: int, fields: dict[str, str], trailers: bool) -> None:
        call = self._calls.get(sid)
        if call is None:
            return
        if not trailers and not call.headers_seen:
            call.headers_seen = True
            status = fields.get(":status", "")
            if status != "200":
                failed = grpcwire.code_of_http(int(status)) if status.isdigit() else 2
                self._end(sid, failed, f"HTTP status {status}", reset=True)
                return
            if "grpc-status" not in fields and not grpcwire.is_grpc(fields.get("content-type")):
                ctype = fields.get("content-type")
                self._end(sid, grpcwire.UNKNOWN, f"not a gRPC response ({ctype})", reset=True)
                return
        code = grpcwire.parse_status(fields.get("grpc-status"))
        if code is None:
            if trailers:
                self._end(sid, grpcwire.INTERNAL, "trailers without grpc-status")
            return  # response headers; the status comes in the trailers
        if call.reader.pending:
            self._end(sid, grpcwire.INTERNAL, "stream ended inside a message")
            return
        self._end(sid, code, grpcwire.decode_message(fields.get("grpc-message", "")))

    def _data(self, sid: int, data: bytes, flow: int) -> None:
        call = self._calls.get(sid)
        if call is None:
            self._h2.acknowledge_received_data(flow, sid) if flow else None
            return
        call.unacked += flow
        try:
            messages = call.reader.feed(data)
        except grpcwire.FramingError as e:
            self._end(sid, e.code, str(e), reset=True)
            return
        for message in messages:
            call.waiting += 1
            self._events.append(MessageReceived(sid, message))
        self._give_back(sid, call)

    def _give_back(self, sid: int, call: _Call) -> None:
        if call.waiting == 0 and call.unacked and not self.closed_reason:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self._h2.acknowledge_received_data(call.unacked, sid)
            call.unacked = 0

    def _flush(self, sid: int) -> None:
        call = self._calls.get(sid)
        if call is None or self.closed_reason:
            return
        while call.outbound:
            window = min(self._h2.local_flow_control_window(sid), self._h2.max_outbound_frame_size)
            if window <= 0:
                return
            chunk = bytes(call.outbound[:window])
            del call.outbound[:window]
            self._h2.send_data(sid, chunk)
        if call.end_after:
            self._h2.end_stream(sid)
            call.end_after = False

    def _end(self, sid: int, code: int, details: str, reset: bool = False) -> None:
        if self._calls.pop(sid, None) is None:
            return
        if reset and not self.closed_reason:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self._h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        self._events.append(CallEnded(sid, code, details))

    def _end_all(self, reason: str) -> None:
        if not self.closed_reason:
            self.closed_reason = reason
        self.closing = True
        for sid in list(self._calls):
            self._end(sid, grpcwire.UNAVAILABLE, reason)


def _fields(headers: list[tuple[str, str]] | list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in headers
    }


def _reset_code(code: h2.errors.ErrorCodes | int) -> int:
    if code == h2.errors.ErrorCodes.CANCEL:
        return grpcwire.CANCELLED
    if code == h2.errors.ErrorCodes.REFUSED_STREAM:
        return grpcwire.UNAVAILABLE
    return grpcwire.INTERNAL
