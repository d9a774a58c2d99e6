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
* the datagram size per connection: aioquic neither sends `max_udp_payload_size` nor honours
  the peer's (RFC 9000 §18.2). We advertise our `max_datagram_size` (a client sets it from its
  path MTU, `gateway.quic_socket`) and send at most the peer's, so a server configured for
  jumbo datagrams still sends a 1,500-byte-path client datagrams that fit its path.
  `set_max_datagram_size` also lowers it later (the path MTU shrank).

Like `gateway.quic_mtls`, it relies on reviewed private attributes of one aioquic release and
checks them at import. It does no I/O.
"""

from __future__ import annotations

from typing import Any

from aioquic._buffer import Buffer
from aioquic.quic import connection as _qc
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import (
    QuicFrameType,
    pull_quic_transport_parameters,
    push_quic_transport_parameters,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.stream import QuicStream, QuicStreamSender

from gateway.quic_mtls import MtlsQuicConnection


def _check_aioquic() -> None:
    missing = [
        name
        for owner, name in (
            (QuicConnection, "_write_stream_limits"),
            (QuicConnection, "_on_max_stream_data_delivery"),
            (QuicConnection, "_serialize_transport_parameters"),
            (QuicConnection, "_parse_transport_parameters"),
            (_qc, "MAX_STREAM_DATA_FRAME_CAPACITY"),
            (_qc, "Limit"),
        )
        if not hasattr(owner, name)
    ]
    sender = QuicStreamSender(stream_id=0, writable=True)
    missing += [
        a
        for a in ("_buffer_stop", "highest_offset", "_pending", "_pending_eof", "reset_pending")
        if not hasattr(sender, a)
    ]
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
        self._peer_max_udp_payload: int | None = None
        for name in (
            "_handshake_confirmed",
            "_close_pending",
            "_handshake_done_pending",
            "_ping_pending",
            "_probe_pending",
            "_loss",
            "_network_paths",
            "_streams_queue",
        ):  # instance attributes: checked here rather than at import
            assert hasattr(self, name), f"aioquic lacks {name}, which gateway.quic_flow uses"

    @property
    def max_datagram_size(self) -> int:
        return self._max_datagram_size

    @property
    def peer_address(self) -> Any:
        """Where we send to now (the server's view follows a migrated client)."""
        return self._network_paths[0].addr if self._network_paths else None

    @property
    def pacing_at(self) -> float | None:
        """When the pacer lets the next datagram go, if it holds one back."""
        pacing_at: float | None = getattr(self, "_pacing_at", None)
        return pacing_at

    def set_max_datagram_size(self, size: int) -> None:
        """Send datagrams of at most `size` bytes from now on (lost ones are re-framed at
        the new size: aioquic retransmits frames, not packets)."""
        if self._peer_max_udp_payload is not None:
            size = min(size, self._peer_max_udp_payload)  # RFC 9000 §18.2
        size = max(SMALLEST_MAX_DATAGRAM_SIZE, size)
        self._max_datagram_size = size
        # The pacer and congestion controller count in datagrams of this size too.
        for part in (getattr(self._loss, "_pacer", None), getattr(self._loss, "_cc", None)):
            if part is not None and hasattr(part, "_max_datagram_size"):
                part._max_datagram_size = size

    def _serialize_transport_parameters(self) -> bytes:
        params = pull_quic_transport_parameters(
            Buffer(data=super()._serialize_transport_parameters())
        )
        params.max_udp_payload_size = self._max_datagram_size
        buf = Buffer(capacity=3 * self._max_datagram_size)
        push_quic_transport_parameters(buf, params)
        return buf.data

    def _parse_transport_parameters(self, data: bytes, from_session_ticket: bool = False) -> None:
        super()._parse_transport_parameters(data, from_session_ticket)
        peer_max = pull_quic_transport_parameters(Buffer(data=data)).max_udp_payload_size
        self._peer_max_udp_payload = peer_max
        if peer_max is not None and peer_max < self._max_datagram_size:
            self.set_max_datagram_size(peer_max)

    def has_unsent_data(self) -> bool:
        """Stream data or a reset waiting to go out (not built yet, or held back by the
        congestion window or flow control, which received ACKs may release)."""
        # `buffer_is_empty` would do, but aioquic updates it only when it next looks.
        return any(
            len(stream.sender._pending) or stream.sender._pending_eof or stream.sender.reset_pending
            for stream in self._streams_queue
        )

    def quiet(self) -> bool:
        """Nothing of ours in flight, waiting or pending but ACKs: what a packet just received
        may make us send (its ACK, window updates, a PATH_RESPONSE) can wait a little instead
        of a flush of its own (`gateway.tunnel`)."""
        return (
            self._handshake_confirmed
            and not self._close_pending
            and not self._handshake_done_pending
            and not self._ping_pending
            and not self._probe_pending
            and self._loss.bytes_in_flight == 0
            and self._network_paths[0].is_validated
            and not self.has_unsent_data()
        )

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
