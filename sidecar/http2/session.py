"""One HTTP/2 connection as a sans-I/O session: h2's state machine, reduced to stream events.

`H2Session` wraps `h2.connection.H2Connection` (python-hyper) for both ends the sidecar plays:
the server of an app connection (h2c, prior knowledge) and the client of a pooled upstream
connection. `receive` turns bytes into a flat list of our own events, one stream each
(`Headers`, `Data`, `Trailers`, `Ended`, `Reset`) or about the connection (`WindowOpened`,
`SettingsChanged`, `GoneAway`): h2's end-of-stream flag is folded into the event that carries
it, so a Trailers-Only gRPC answer is one `Headers(end=True)`. `send_data` sends what the flow
control windows and the frame size allow and says how much; the driver waits for a
`WindowOpened` to send the rest. Received data is handed back to the peer's window only when
the driver calls `ack` (after the bytes moved on), which is what bounds every buffer.
No I/O, no clock: the driver (`sidecar.http2.conn`) moves `data_to_send()` to the socket.

A received GOAWAY does not end the session (RFC 9113 §6.8: streams up to its last-stream-id
may still complete). h2 4.x ends it at once, dropping what we queued and refusing every later
frame, so the answers a server sends after its GOAWAY (nginx's `keepalive_requests`, Envoy's
`max_requests_per_connection`, Go's graceful shutdown) would fail as protocol errors
(python-hyper/h2#1181, open): `_GracefulH2` reports it and leaves the connection open; the
driver opens no new stream on it and treats the streams above the last-stream-id as refused.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

Fields = tuple[tuple[str, str], ...]

MAX_CONCURRENT_STREAMS = 128  # what we let a peer open towards us
WINDOW = 1 << 20  # our receive window per stream and for the connection (the default is 64 KiB)
NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
CANCEL = h2.errors.ErrorCodes.CANCEL
REFUSED_STREAM = h2.errors.ErrorCodes.REFUSED_STREAM
INTERNAL_ERROR = h2.errors.ErrorCodes.INTERNAL_ERROR


class H2SessionError(Exception):
    """The peer broke the HTTP/2 protocol: the connection is over (GOAWAY already queued)."""


class StreamClosedError(Exception):
    """We tried to send on a stream that is closed (reset by the peer, or ended)."""


@dataclass(frozen=True, slots=True)
class Headers:
    stream: int
    headers: Fields
    end: bool  # the stream ended with these headers (a request without body, Trailers-Only)


@dataclass(frozen=True, slots=True)
class Data:
    stream: int
    data: bytes
    flow: int  # flow-controlled length (data plus padding): what `ack` must hand back
    end: bool


@dataclass(frozen=True, slots=True)
class Trailers:
    stream: int
    headers: Fields  # always ends the stream


@dataclass(frozen=True, slots=True)
class Ended:
    stream: int  # the stream ended without a frame to fold the end into (h2 folds it mostly)


@dataclass(frozen=True, slots=True)
class Reset:
    stream: int
    code: int


@dataclass(frozen=True, slots=True)
class WindowOpened:
    stream: int  # 0: the connection window


@dataclass(frozen=True, slots=True)
class SettingsChanged:
    max_concurrent_streams: int


@dataclass(frozen=True, slots=True)
class GoneAway:
    code: int
    last_stream: int  # streams we opened above this were never processed (safe to retry)
    detail: str


StreamEvent = Headers | Data | Trailers | Ended | Reset
Event = StreamEvent | WindowOpened | SettingsChanged | GoneAway


def _pairs(headers: object) -> Fields:
    assert isinstance(headers, list), headers
    return tuple((str(k), str(v)) for k, v in headers)


class _GracefulH2(h2.connection.H2Connection):
    """h2's connection with RFC 9113 §6.8 GOAWAY handling on receipt (module docstring).
    Checked against h2 4.x (`_receive_goaway_frame` is what its frame dispatch calls)."""

    def _receive_goaway_frame(
        self, frame: hyperframe.frame.GoAwayFrame
    ) -> tuple[list[hyperframe.frame.Frame], list[h2.events.Event]]:
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors._error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class H2Session:
    def __init__(self, client: bool) -> None:
        config = h2.config.H2Configuration(client_side=client, header_encoding="utf-8")
        self.client = client
        self._h2 = _GracefulH2(config)
        self.gone_away = False
        self._goaway = b""  # our graceful GOAWAY, queued after what h2 queued before it

    def start(self) -> None:
        """Queue our preface and settings (call once, before anything else)."""
        self._h2.initiate_connection()
        self._h2.update_settings(
            {
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
            }
        )
        self._h2.increment_flow_control_window(WINDOW - 65_535)

    # -- receiving --------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        try:
            raw = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as err:
            raise H2SessionError(f"{type(err).__name__}: {err}") from err
        ends = (getattr(x, "stream_ended", None) for x in raw)
        folded = {id(x) for x in ends if x is not None}
        out: list[Event] = []
        for e in raw:
            match e:
                case h2.events.RequestReceived() | h2.events.ResponseReceived():
                    sid = e.stream_id
                    assert sid is not None
                    end = e.stream_ended is not None
                    out.append(Headers(sid, _pairs(e.headers), end))
                case h2.events.TrailersReceived():
                    assert e.stream_id is not None
                    out.append(Trailers(e.stream_id, _pairs(e.headers)))
                case h2.events.DataReceived():
                    assert e.stream_id is not None
                    assert e.data is not None
                    flow = e.flow_controlled_length or 0
                    out.append(Data(e.stream_id, e.data, flow, e.stream_ended is not None))
                case h2.events.StreamEnded() if id(e) not in folded:
                    assert e.stream_id is not None
                    out.append(Ended(e.stream_id))
                case h2.events.StreamReset():
                    assert e.stream_id is not None
                    out.append(Reset(e.stream_id, int(e.error_code or 0)))
                case h2.events.WindowUpdated():
                    out.append(WindowOpened(e.stream_id or 0))
                case h2.events.RemoteSettingsChanged():
                    out.append(SettingsChanged(self.max_outbound_streams))
                    out.append(WindowOpened(0))  # INITIAL_WINDOW_SIZE may have grown
                case h2.events.ConnectionTerminated():
                    self.gone_away = True
                    detail = (e.additional_data or b"").decode("utf-8", "replace")
                    out.append(GoneAway(int(e.error_code or 0), e.last_stream_id or 0, detail))
                case _:
                    pass  # pings (answered by h2), settings ACKs, priorities, 1xx, unknown frames
        return out

    def ack(self, stream: int, flow: int) -> None:
        """Hand `flow` bytes of received data back to the peer's windows."""
        if flow <= 0:
            return
        # A stream already gone: h2 has credited the connection window itself.
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.acknowledge_received_data(flow, stream)

    # -- sending ----------------------------------------------------------------------------

    def new_stream(self) -> int:
        return int(self._h2.get_next_available_stream_id())

    @property
    def max_outbound_streams(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams)

    @property
    def open_outbound_streams(self) -> int:
        return int(self._h2.open_outbound_streams)

    def send_headers(self, stream: int, headers: Fields, end: bool = False) -> None:
        try:
            self._h2.send_headers(stream, list(headers), end_stream=end)
        except h2.exceptions.ProtocolError as e:
            raise StreamClosedError(f"stream {stream}: {e}") from e

    def send_data(self, stream: int, data: bytes | memoryview, end: bool) -> int:
        """Send as much of `data` as the windows allow (`end` only with the last byte); how
        much was taken. 0 means: wait for a `WindowOpened`."""
        size = len(data)
        room = min(self._h2.local_flow_control_window(stream), size)
        frame = self._h2.max_outbound_frame_size
        sent = 0
        try:
            while sent < room:
                n = min(frame, room - sent)
                last = end and sent + n == size
                self._h2.send_data(stream, bytes(data[sent : sent + n]), end_stream=last)
                sent += n
            if end and size == 0:
                self._h2.end_stream(stream)
        except h2.exceptions.ProtocolError as e:
            raise StreamClosedError(f"stream {stream}: {e}") from e
        return sent

    def end_stream(self, stream: int) -> None:
        try:
            self._h2.end_stream(stream)
        except h2.exceptions.ProtocolError as e:
            raise StreamClosedError(f"stream {stream}: {e}") from e

    def reset(self, stream: int, code: int = CANCEL) -> None:
        """Reset a stream if it is still open (otherwise there is nothing to tell the peer)."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream, error_code=code)

    def close(self, code: int = NO_ERROR, detail: str = "") -> None:
        """GOAWAY: no new streams; those in flight may finish."""
        if not self.gone_away:
            self.gone_away = True
            self._h2.close_connection(error_code=code, additional_data=detail.encode()[:256])

    def drain(self, detail: str = "") -> None:
        """GOAWAY naming the last stream the peer opened, keeping the session open so the
        streams up to it finish (RFC 9113 §6.8; h2's own GOAWAY would end them, see the
        module docstring). The peer opens no new stream; one it opened meanwhile is refused."""
        if not self.gone_away:
            self.gone_away = True
            frame = hyperframe.frame.GoAwayFrame(
                0,
                last_stream_id=self._h2.highest_inbound_stream_id,
                error_code=NO_ERROR,
                additional_data=detail.encode()[:256],
            )
            self._goaway = frame.serialize()

    def data_to_send(self) -> bytes:
        out = bytes(self._h2.data_to_send()) + self._goaway
        self._goaway = b""
        return out
