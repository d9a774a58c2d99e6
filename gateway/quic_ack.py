"""An optional acknowledgement policy for the QUIC tunnel: ACKs ride on the answer instead of
packets of their own. Off by default (`TunnelSettings.lone_ack_delay=None`); see the trade-off
at the end.

aioquic 1.7 acknowledges every ack-eliciting 1-RTT packet 1 ms after receiving it, in a packet
of its own unless data happens to be sent *after* that millisecond: it never puts a pending ACK
on data it sends sooner. A call through the tunnel is a request/response, so at low rates each
exchange is four packets: request, response, then, 1 ms later, an ACK-only packet each way,
each of which wakes a gateway (a timer in one, a receive in the other) whose code has gone cold
(~100-200 µs of CPU each here, `bench/quic_latency.py --trace`, `bench/quic_cold.py`).

The policy (RFC 9000 §13.2 leaves it to the receiver, within the `max_ack_delay` it advertised,
25 ms for aioquic):

* piggyback: when we are about to send stream data, a pending ACK goes in the same packet now
  (§13.2.1 allows any packet to carry one); the response acknowledges the request.
* a lone packet waits longer: while exactly one ack-eliciting packet is unacknowledged and it
  arrived in order, its ACK may wait `lone_ack_delay` (20 ms, under the advertised 25 ms that
  the peer's probe timeout includes, RFC 9002 §6.2.1), so at call rates above ~50/s per
  connection the next request carries it and no ACK-only packet is sent at all.
* ACKs we receive are handled off the exchange's path: aioquic writes the ACK frame first in
  a packet and handles frames in order, so the loss and congestion bookkeeping (~40 µs cold)
  would run before the stream data reached the TCP side and, handled at the next flush,
  before the answer could be built. Once the handshake is confirmed, a 1-RTT ACK frame is set
  aside while its packet is parsed; the driver (`gateway.tunnel`) calls
  `handle_deferred_acks()` after its next send, or within 1 ms; `handle_timer` handles them
  first, and `datagrams_to_send` too when the congestion window looks full without them. They
  are handled with their receive time, so RTT samples are unchanged. Building a packet before
  them only means counting a few more bytes in flight than there are (conservative) and
  finding a loss one send later.
* everything else as aioquic does: two or more unacknowledged packets (a bulk transfer: its
  ACK clock and congestion window growth are unchanged), a gap in what we received (loss:
  §13.2.1 asks for an immediate ACK; aioquic's 1 ms is what it gets), a PING (keepalive RTT
  probes and loss probes want a prompt answer), Initial and Handshake packets.

The trade-off, measured (`docs/transports.md`): half the packets and wake-ups per call and ~30 %
less gateway CPU per call at 100 calls/s, the same at 1,000/s and above (aioquic then
piggybacks by itself), bulk throughput unchanged; but the ACK frames written and parsed on the
request and the response add ~10-25 µs to each of the four steps of an exchange's path, ~0.1 ms
of p50 at 100/s. Issue 7's target is latency, so it is off by default.

It relies on private attributes of aioquic 1.7 (checked at import and construction, like
`gateway.quic_mtls`) and does no I/O.
"""

from __future__ import annotations

from typing import Any

from aioquic import tls
from aioquic._buffer import Buffer
from aioquic.quic.connection import QuicConnection, QuicConnectionError, QuicReceiveContext
from aioquic.quic.packet import QuicFrameType, pull_ack_frame
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace

from gateway.quic_flow import TunnelQuicConnection

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


def new_connection(*, lone_ack_delay: float | None, **kwargs: Any) -> TunnelQuicConnection:
    """A tunnel connection with aioquic's ACK timing (`lone_ack_delay=None`: not one override
    more on the per-packet path) or with the policy of the module docstring."""
    if lone_ack_delay is None:
        return TunnelQuicConnection(**kwargs)
    return AckingQuicConnection(lone_ack_delay=lone_ack_delay, **kwargs)


class AckingQuicConnection(TunnelQuicConnection):
    """A tunnel QuicConnection with the acknowledgement policy of the module docstring."""

    def __init__(self, *, lone_ack_delay: float = LONE_ACK_DELAY, **kwargs: Any) -> None:
        if not 0 <= lone_ack_delay < ADVERTISED_MAX_ACK_DELAY:
            raise ValueError(
                f"lone_ack_delay must be in [0, {ADVERTISED_MAX_ACK_DELAY}) s"
                f" (the max_ack_delay we advertise), got {lone_ack_delay}"
            )
        super().__init__(**kwargs)
        # Instance attributes, so checked here rather than at import.
        for name in ("_spaces", "_ack_delay"):
            assert hasattr(self, name), f"aioquic lacks {name}, which gateway.quic_ack uses"
        self._lone_ack_delay = lone_ack_delay
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
        if is_ack_eliciting and context.epoch == tls.Epoch.ONE_RTT:
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
            self._handshake_confirmed
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

    @property
    def deferred_acks(self) -> bool:
        return bool(self._deferred_acks)

    def handle_timer(self, now: float) -> None:
        # A loss timer must see every ACK received before it, and its deadline recomputed
        # from them (aioquic computes it in get_timer): a stale one would send a probe.
        if self.handle_deferred_acks():
            super().get_timer()
        super().handle_timer(now)

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
        self._data_queued = True

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        """Builds with the ACKs set aside still unhandled (the driver handles them after its
        send, then asks again), unless the congestion window looks full without them."""
        loss = self._loss
        if (
            self._deferred_acks
            and loss.bytes_in_flight + self._max_datagram_size > loss.congestion_window
        ):
            self.handle_deferred_acks()
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
