"""Per-stream backpressure for the QUIC tunnel, on top of aioquic 1.7 internals.

aioquic has no application-paced receive window: it doubles a stream's MAX_STREAM_DATA whenever
the peer has sent half of it, whether or not the application consumed anything, so a fast
sender and a slow TCP consumer would make the gateway buffer without bound. It also exposes no
send-buffer size. `TunnelQuicConnection` adds, per stream:

* `hold(stream_id)` / `release(stream_id)`: while held (the TCP side we write into is above its
  high-water mark), the receive window is not raised; otherwise it is kept at
  `delivered + window`, raised once half of it is used (RFC 9000 §4.2 leaves the policy to us).
  Unconsumed data per stream is thus bounded by `window` plus the TCP write buffer.
* `send_backlog(stream_id)`: bytes written but not yet sent, so the driver can pause reading
  the TCP side while it is large (bytes in flight are bounded by the peer's window).
* a configurable limit of concurrently open peer-initiated bidirectional streams (aioquic hard
  codes 128).

Like `gateway.quic_mtls`, it relies on reviewed private attributes of one aioquic release and
checks them at import. It does no I/O.
"""

from __future__ import annotations

from typing import Any

from aioquic.quic import connection as _qc
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicFrameType
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.stream import QuicStream, QuicStreamSender

from gateway.quic_mtls import MtlsQuicConnection


def _check_aioquic() -> None:
    missing = [
        name
        for owner, name in (
            (QuicConnection, "_write_stream_limits"),
            (QuicConnection, "_on_max_stream_data_delivery"),
            (_qc, "MAX_STREAM_DATA_FRAME_CAPACITY"),
            (_qc, "Limit"),
        )
        if not hasattr(owner, name)
    ]
    sender = QuicStreamSender(stream_id=0, writable=True)
    missing += [a for a in ("_buffer_stop", "highest_offset") if not hasattr(sender, a)]
    stream = QuicStream(stream_id=0)
    missing += [
        a for a in ("max_stream_data_local", "max_stream_data_local_sent") if not hasattr(stream, a)
    ]
    if missing:
        raise ImportError(f"aioquic lacks internals gateway.quic_flow relies on: {missing}")


_check_aioquic()


class TunnelQuicConnection(MtlsQuicConnection):
    """An mTLS QuicConnection with application-paced stream windows (module docstring)."""

    def __init__(self, *, max_streams: int = 1024, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Set before _initialize serializes the transport parameters.
        limit = self._local_max_streams_bidi
        limit.value = limit.sent = max_streams
        self._window = self._configuration.max_stream_data
        self._held: set[int] = set()

    def hold(self, stream_id: int) -> None:
        self._held.add(stream_id)

    def release(self, stream_id: int) -> None:
        self._held.discard(stream_id)

    def send_backlog(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return max(0, sender._buffer_stop - sender.highest_offset)

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: Any, stream: QuicStream
    ) -> None:
        if (
            stream.max_stream_data_local
            and stream.stream_id not in self._held
            and not stream.receiver.is_finished
        ):
            target = stream.receiver.starting_offset() + self._window
            if target - stream.max_stream_data_local >= self._window // 2:
                stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            assert stream.stream_id is not None
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=_qc.MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local
