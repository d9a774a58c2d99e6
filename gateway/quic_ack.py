"""When the QUIC tunnel acknowledges: ACKs ride on the answer instead of packets of their own.

aioquic 1.7 acknowledges every ack-eliciting 1-RTT packet exactly 1 ms after receiving it, in a
packet of its own unless data happens to be sent *after* that millisecond: it never puts a
pending ACK on the data it sends sooner. A call through the tunnel is a request/response, so
each exchange cost four packets instead of two: request, response, then, 1 ms later, an
ACK-only packet each way. On this machine every one of those wakes a process whose code has
gone cold (a timer in one gateway, a receive in the other, ~100-200 µs of CPU each, measured
with `bench/quic_latency.py --trace`), twice the work of the exchange itself, and at 1,000
calls/s they land on the next request's critical path.

Policy here (RFC 9000 §13.2 leaves it to the receiver, within the `max_ack_delay` it
advertised, 25 ms for aioquic):

* piggyback: when we are about to send stream data, a pending ACK goes in the same packet now
  (§13.2.1 allows any packet to carry one); the response acknowledges the request.
* a lone packet waits longer: while exactly one ack-eliciting packet is unacknowledged and it
  arrived in order, its ACK may wait `lone_ack_delay` (20 ms, under the advertised 25 ms that
  the peer's probe timeout includes, RFC 9002 §6.2.1), so at call rates above ~50/s per
  connection the next request carries it and no ACK-only packet is sent at all.
* ACKs we receive are handled after the data that came with them: aioquic writes the ACK
  frame first in a packet and handles frames in order, so the sender's loss and congestion
  bookkeeping (~40 µs cold) ran before the stream data reached the TCP side. Once the
  handshake is confirmed, a 1-RTT ACK frame is set aside while its packet is parsed and
  handled at the next `datagrams_to_send`, `handle_timer` or `get_timer` (the driver calls
  them after delivering the data), with its receive time, so RTT samples are unchanged.
  Without this, piggybacked ACKs would have put that bookkeeping on every exchange's path.
* everything else as aioquic does: two or more unacknowledged packets (a bulk transfer: its
  ACK clock and congestion window growth are unchanged), a gap in what we received (loss:
  §13.2.1 asks for an immediate ACK; aioquic's 1 ms is what it gets), a PING (keepalive RTT
  probes and loss probes want a prompt answer), Initial and Handshake packets.

It relies on private attributes of aioquic 1.7 (checked at import, like `gateway.quic_mtls`)
and does no I/O; the driver needs nothing new (`get_timer` already includes the ACK time).
"""

from __future__ import annotations

from typing import Any

from aioquic import tls
from aioquic._buffer import Buffer
from aioquic.quic.connection import QuicConnection, QuicConnectionError, QuicReceiveContext
from aioquic.quic.packet import QuicFrameType, pull_ack_frame
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace

from gateway.quic_mtls import MtlsQuicConnection

LONE_ACK_DELAY = 0.020  # seconds; must stay under the advertised max_ack_delay
ADVERTISED_MAX_ACK_DELAY = 0.025  # aioquic 1.7 advertises 25 ms (connection.py)


def _check_aioquic() -> None:
    missing = [
        name
        for name in (
            "_payload_received",
            "_handle_ping_frame",
            "_handle_ack_frame",
            "_write_ack_frame",
        )
        if not hasattr(QuicConnection, name)
    ]
    space = QuicPacketSpace()
    missing += [a for a in ("ack_at", "ack_queue") if not hasattr(space, a)]
    if missing:
        raise ImportError(f"aioquic lacks internals gateway.quic_ack relies on: {missing}")


_check_aioquic()


class AckingQuicConnection(MtlsQuicConnection):
    """An mTLS QuicConnection with the acknowledgement policy of the module docstring."""

    def __init__(self, *, lone_ack_delay: float | None = LONE_ACK_DELAY, **kwargs: Any) -> None:
        """`lone_ack_delay=None` keeps aioquic's own timing (no piggybacking either)."""
        if lone_ack_delay is not None and not 0 <= lone_ack_delay < ADVERTISED_MAX_ACK_DELAY:
            raise ValueError(
                f"lone_ack_delay must be in [0, {ADVERTISED_MAX_ACK_DELAY}) s"
                f" (the max_ack_delay we advertise), got {lone_ack_delay}"
            )
        super().__init__(**kwargs)
        # Instance attributes, so checked here rather than at import.
        assert hasattr(self, "_spaces")
        assert hasattr(self, "_ack_delay")
        self._ack_policy = lone_ack_delay is not None
        self._lone_ack_delay = lone_ack_delay or 0.0
        self._unacked = 0  # ack-eliciting 1-RTT packets received since our last ACK
        self._unacked_since = 0.0  # when the first of them arrived
        self._ack_promptly = False  # one of them was a PING
        self._data_queued = False  # stream data written since the last datagrams_to_send
        self._deferred_acks: list[tuple[QuicReceiveContext, int, bytes]] = []

    def _app_space(self) -> QuicPacketSpace | None:
        return self._spaces.get(tls.Epoch.ONE_RTT)

    # --- receiving: count what needs acknowledging -------------------------------------------

    def _payload_received(
        self, context: QuicReceiveContext, plain: bytes, crypto_frame_required: bool = False
    ) -> tuple[bool, bool]:
        is_ack_eliciting, is_probing = super()._payload_received(
            context, plain, crypto_frame_required=crypto_frame_required
        )
        if is_ack_eliciting and self._ack_policy and context.epoch == tls.Epoch.ONE_RTT:
            if not self._unacked:
                self._unacked_since = context.time
            self._unacked += 1
        return is_ack_eliciting, is_probing

    def _handle_ping_frame(self, context: QuicReceiveContext, frame_type: int, buf: Any) -> None:
        if context.epoch == tls.Epoch.ONE_RTT:
            self._ack_promptly = True
        super()._handle_ping_frame(context, frame_type, buf)

    def _handle_ack_frame(self, context: QuicReceiveContext, frame_type: int, buf: Buffer) -> None:
        if not (
            self._ack_policy
            and self._handshake_confirmed
            and context.epoch == tls.Epoch.ONE_RTT
            and not self._close_pending
        ):
            super()._handle_ack_frame(context, frame_type, buf)
            return
        start = buf.tell()
        try:
            pull_ack_frame(buf)  # only to find where the next frame starts
            if frame_type == QuicFrameType.ACK_ECN:
                for _ in range(3):
                    buf.pull_uint_var()
        except ValueError:
            buf.seek(start)  # malformed: let aioquic refuse it now, with its own error
            super()._handle_ack_frame(context, frame_type, buf)
            return
        self._deferred_acks.append((context, frame_type, buf.data_slice(start, buf.tell())))

    def handle_deferred_acks(self) -> bool:
        """Handle the ACK frames set aside (module docstring); False if there were none.
        They may produce events (PingAcknowledged, ConnectionTerminated)."""
        if not self._deferred_acks:
            return False
        pending, self._deferred_acks = self._deferred_acks, []
        for context, frame_type, frame in pending:
            try:
                super()._handle_ack_frame(context, frame_type, Buffer(data=frame))
            except QuicConnectionError as exc:  # as receive_datagram would have
                self._logger.warning(exc)
                self.close(
                    error_code=exc.error_code,
                    frame_type=exc.frame_type,
                    reason_phrase=exc.reason_phrase,
                )
                break
        return True

    def handle_timer(self, now: float) -> None:
        self.handle_deferred_acks()  # a loss timer must see every ACK received before it
        super().handle_timer(now)

    def get_timer(self) -> float | None:
        self.handle_deferred_acks()
        return super().get_timer()

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        super().receive_datagram(data, addr, now)
        space = self._app_space()
        if space is None or space.ack_at is None or not self._unacked:
            return
        if (
            self._unacked == 1
            and not self._ack_promptly
            and len(space.ack_queue) == 1  # no gap: nothing looks lost
            and self._lone_ack_delay > self._ack_delay
        ):
            space.ack_at = self._unacked_since + self._lone_ack_delay
        else:  # aioquic's own timing, from the first unacknowledged packet
            space.ack_at = min(space.ack_at, self._unacked_since + self._ack_delay)

    # --- sending: acknowledge on the data we send ---------------------------------------------

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        super().send_stream_data(stream_id, data, end_stream)
        self._data_queued = self._ack_policy

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        self.handle_deferred_acks()  # the congestion window and losses, up to date
        if self._data_queued:
            self._data_queued = False
            space = self._app_space()
            if space is not None and space.ack_at is not None and space.ack_at > now:
                space.ack_at = now  # due now: the next packet carries it (pacing unaffected)
        return super().datagrams_to_send(now)

    def _write_ack_frame(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, now: float
    ) -> None:
        super()._write_ack_frame(builder, space, now)
        if space is self._app_space():
            self._unacked = 0
            self._ack_promptly = False
