"""The QUIC tunnel between gateways: a thin asyncio driver around aioquic's QuicConnection.

One `TunnelConnection` drives one QUIC connection (model: aioquic `asyncio/protocol.py`): feed
datagrams in, drain events, flush datagrams, re-arm one timer. Each call is one bidirectional
stream (`gateway.stream.TunnelStream`): the opener sends a `StreamHeader` frame, the other side
answers with a `StreamReply` frame, then bytes flow both ways with FIN (half-close) propagated
and a reset on error. A stream hands its bytes to a `StreamSink` (the TCP side,
`gateway.splice`); until one is attached, it buffers within its flow-control window
(`gateway.quic_flow`), never more.

Rules:
* A peer's protocol violation (garbage header, bad reply) closes that stream with a logged
  reason; an exception inside aioquic closes that connection; nothing escapes the driver.
* The server side only learns of a stream from the peer; stream ids below the highest one seen
  that are unknown belong to streams already finished and are ignored.
* Flushing: a stream write flushes in the same loop turn (`transmit_soon`); so does a received
  packet, unless nothing of ours is in flight or waiting (`TunnelQuicConnection.quiet()`):
  then its answer's send flushes, or a flush within `LAZY_FLUSH` (1 ms), so the empty flush
  does not sit between a delivered request and its answer. The timer is re-armed after the
  send. With `TunnelSettings.lone_ack_delay` the ACK policy of `gateway.quic_ack` applies.
* Backpressure: a sink pauses its TCP reads when `backlog()` exceeds `send_high_water` and is
  told `stream_writable()` once it falls under `send_low_water`; it holds the stream's receive
  window while its TCP write buffer is full (`hold_credit`/`release_credit`).

Client sockets (`gateway.quic_socket`): the client owns a connected UDP socket whose datagram
size follows the path MTU. When sending on it fails because its source address is gone
(ENETUNREACH, EADDRNOTAVAIL, EINVAL: the gateway's address changed), the connection moves to a
fresh connected socket, which the kernel gives the new source address, switches to a new
peer-issued connection ID (RFC 9000 §9.5: never reuse one from a new address) and transmits;
the server routes by connection ID and validates the new path itself (§9.3). Datagrams lost
meanwhile are recovered by QUIC's loss detection. EMSGSIZE means the path MTU shrank: the
datagram size is lowered to the new one.

Not here: stream phases (`gateway.stream`), listening (`gateway.server`), pooling per peer
(`gateway.pool`), TCP (`gateway.splice`). A little over the ~400-line aim: the connection's
event dispatch, timers, keepalive and teardown read best as one class.
"""

from __future__ import annotations

import asyncio
import copy
import errno
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress

from ca.errors import CertificateExpiredError, VerificationError
from gateway import quic_socket, quic_udp
from gateway.errors import TunnelError, TunnelTimeoutError
from gateway.health import HealthSettings, ProbeHealth
from gateway.liveness import LinkWatch
from gateway.quic_ack import AckingQuicConnection, new_connection
from gateway.quic_flow import TunnelQuicConnection
from gateway.quic_mtls import PeerPolicy
from gateway.quic_socket import MIGRATE_ERRNOS, ClientSocket
from gateway.stream import HeaderPhase, StreamHandler, TunnelStream
from mesh.naming import SpiffeId

ALPN = "fedgate-tunnel/1"

# CONNECTION_CLOSE application codes.
CLOSE_SHUTDOWN = 0x0
CLOSE_UNAUTHENTICATED = 0x10
CLOSE_INTERNAL = 0x11
MAX_ICMP_REFUSED = 3
TIMER_GRANULARITY = 0.001
LAZY_FLUSH = 0.001  # at most this late: a flush after a packet that needs no answer now
# aioquic's clock. Not loop.time(): uvloop's has millisecond resolution, which starves the
# pacer; both loops' timers use CLOCK_MONOTONIC, so call_at() accepts these instants.
_clock = time.monotonic

_log = structlog.get_logger("fedgate.gateway.tunnel")


@dataclass(frozen=True, slots=True)
class TunnelSettings:
    """QUIC tunnel tuning. Windows are large because the WAN hop is long and fat; every buffer
    is still bounded by them."""

    max_datagram_size: int = 1350
    idle_timeout: float = 30.0
    keepalive_interval: float = 10.0  # PINGs at least this often (health probes usually more)
    handshake_timeout: float = 5.0
    reply_timeout: float = 10.0
    max_stream_data: int = 4 * 1024 * 1024
    max_data: int = 16 * 1024 * 1024
    max_streams: int = 1024
    max_connections: int = 256
    send_high_water: int = 512 * 1024
    send_low_water: int = 128 * 1024
    udp_offload: bool = True  # GSO send, GRO receive (`gateway.quic_udp`)
    # aioquic's default is Reno. CUBIC (RFC 9438) regrows the window faster after a loss on a
    # fat pipe: a burst dropped by a full socket buffer costs less (docs/transports.md).
    congestion_control: str = "cubic"
    health: HealthSettings = field(default_factory=HealthSettings)  # client side probes
    # None (default): aioquic's own ACK timing, an ACK-only packet 1 ms after each packet.
    # A delay (e.g. `quic_ack.LONE_ACK_DELAY`): ACKs ride on the answer, half the packets and
    # wake-ups per call at low rates, ~0.1 ms more p50 here (`gateway.quic_ack`).
    lone_ack_delay: float | None = None

    def configuration(self, *, is_client: bool) -> QuicConfiguration:
        return QuicConfiguration(
            alpn_protocols=[ALPN],
            is_client=is_client,
            idle_timeout=self.idle_timeout,
            max_datagram_size=self.max_datagram_size,
            max_stream_data=self.max_stream_data,
            max_data=self.max_data,
            congestion_control_algorithm=self.congestion_control,
        )


class TunnelConnection(asyncio.DatagramProtocol):
    """Drives one QUIC connection. Client: it owns its UDP socket; server: `TunnelServer`
    feeds it datagrams and lends it the listening socket."""

    def __init__(
        self,
        quic: TunnelQuicConnection,
        settings: TunnelSettings,
        *,
        log: Any = _log,
        stream_handler: StreamHandler | None = None,
        identify: Callable[[SpiffeId], str] | None = None,
    ) -> None:
        self.quic = quic
        # The ACK policy's hooks (`gateway.quic_ack`), None with aioquic's own ACK timing.
        self._acking = quic if isinstance(quic, AckingQuicConnection) else None
        self.settings = settings
        self.log = log.bind(conn=quic.original_destination_connection_id.hex()[:8])
        quic.log = self.log
        self.peer_identity: SpiffeId | None = None
        self.peer_cluster = ""
        self.close_reason = ""
        # probes: keepalive PINGs sent (client side); probes_answered: their ACKs, in time.
        self.counters: dict[str, int] = {
            "streams": 0,
            "bad_headers": 0,
            "probes": 0,
            "probes_answered": 0,
            "migrations": 0,
        }
        self.streams: dict[int, TunnelStream] = {}
        self.retiring = False
        self.on_cid_issued: Callable[[bytes], None] = lambda cid: None
        self.on_cid_retired: Callable[[bytes], None] = lambda cid: None
        self.on_closed: Callable[[TunnelConnection], None] = lambda conn: None
        self._stream_handler = stream_handler
        self._identify = identify
        self._loop = asyncio.get_running_loop()
        self._transport: Any = None  # a quic_udp.UdpEndpoint (or an asyncio datagram transport)
        self._owns_transport = False
        self._peer: NetworkAddress | None = None  # client: what its socket is connected to
        self.local_address = ""  # client: its socket's current source address
        self._migrating: asyncio.Handle | None = None
        self._connected: asyncio.Future[None] = self._loop.create_future()
        self._closed = asyncio.Event()
        self._timer: asyncio.Handle | None = None
        self._timer_at: float | None = None
        self._transmit_handle: asyncio.Handle | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._watched: set[TunnelStream] = set()
        self._next_peer_stream = 0
        self._refused = 0
        self._dialled_at = _clock()
        self.health = ProbeHealth(settings.health)  # client side: our probes of the peer
        self.rtt: float | None = None  # seconds, smoothed, from the probes (client side)
        # Client side: a silent peer while streams wait is probed at once (`gateway.liveness`).
        self._watch = LinkWatch(self.health, self._send_probe, self.streams, self._health_changed)

    # --- state ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.done() and not self._connected.exception()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def usable(self) -> bool:
        return (
            not self.closed and not self.retiring and not self.close_reason and self.health.healthy
        )

    async def wait_connected(self) -> None:
        """Wait for an authenticated handshake (the caller bounds the wait); TunnelError."""
        await asyncio.shield(self._connected)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # --- API --------------------------------------------------------------------------------

    def open_stream(self) -> TunnelStream:
        if not self.usable:
            raise TunnelError(f"tunnel connection is closing ({self.close_reason or 'retired'})")
        stream_id = self.quic.get_next_available_stream_id()
        stream = TunnelStream(self, stream_id)
        self.streams[stream_id] = stream
        self.counters["streams"] += 1
        self._watch.opened()
        return stream

    def suspect(self) -> None:
        """Probe the link now, with the short timeout of a suspect link (`gateway.liveness`)."""
        if self.quic.configuration.is_client and self.connected and not self.closed:
            self._watch.suspect()

    def close(self, reason: str, code: int = CLOSE_SHUTDOWN) -> None:
        if not self.close_reason:
            self.close_reason = reason
        self.quic.close(error_code=code, reason_phrase=reason)
        self.transmit()

    def revalidate(self) -> str | None:
        """Re-check the peer against the current bundle and policy (after a config change,
        a removed root or an expired certificate); close the connection if it no longer
        passes. Returns the reason it was closed, or None."""
        if not self.connected or self.closed:
            return None
        try:
            identity = self.quic.authenticated_peer()
            denied = self.quic.peer_policy.authorize(identity)
        except CertificateExpiredError:
            # The certificate the peer authenticated with expired after a routine renewal: the
            # connection stays trusted for its open streams, and the dialling side retires it
            # so new calls get a fresh handshake with the renewed certificates.
            if self.quic.configuration.is_client:
                self.retire()
            return None
        except VerificationError as e:
            denied = str(e)
        if denied is not None:
            self.log.warning("tunnel peer no longer trusted", reason=denied)
            self.close(f"peer no longer trusted: {denied}", CLOSE_UNAUTHENTICATED)
        return denied

    def retire(self) -> None:
        """Take no new streams; close once the open ones are done."""
        self.retiring = True
        self._cancel_keepalive()
        if not self.streams:
            self.close("retired")

    # --- asyncio.DatagramProtocol --------------------------------------------------------------

    def use_transport(self, transport: Any) -> None:
        """Server: send on the listener's shared socket."""
        self._transport = transport

    def use_client_socket(self, transport: Any, peer: NetworkAddress) -> None:
        """Client: send on our own socket, connected to `peer` (`gateway.quic_socket`)."""
        self._transport = transport
        self._owns_transport = True
        self._peer = peer
        sock = transport.get_extra_info("socket")
        self.local_address = quic_socket.local_address(sock) if sock is not None else ""

    def is_current(self, transport: asyncio.BaseTransport) -> bool:
        return transport is self._transport

    @property
    def peer_address(self) -> str:
        addr = self.quic.peer_address
        return f"{addr[0]}:{addr[1]}" if addr else ""

    @property
    def max_datagram_size(self) -> int:
        return self.quic.max_datagram_size

    def connect(self, addr: NetworkAddress) -> None:
        self._dialled_at = _clock()
        self.quic.connect(addr, now=_clock())
        self.transmit()

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        self._refused = 0
        self._watch.last_heard = _clock()
        try:
            self.quic.receive_datagram(cast(bytes, data), addr, now=_clock())
        except Exception as e:  # aioquic bug or unexpected input: lose this connection only
            self.log.error("tunnel connection failed on input", error=repr(e), exc_info=e)
            self.close(f"internal error: {e!r}"[:200], CLOSE_INTERNAL)
        self._process_events()
        if self.closed:
            return
        acking = self._acking
        if (
            acking is not None and acking.deferred_acks and not acking.has_unsent_data()
        ) or self.quic.quiet():
            # Nothing of ours waits on this packet: a flush now would build nothing (the ACK
            # we owe is 1 ms away; with `gateway.quic_ack`, the ACKs it carried can wait for
            # our next send) yet sit between the data just delivered and its answer, ~45 µs
            # cold (`bench/quic_latency.py --trace`). The answer's send does it, or this
            # within 1 ms: what the packet asks of us (its ACK, a window update, a control
            # frame it found lost) is not left to the idle timer.
            self._flush_later()
        else:
            # Deferred so a burst of datagrams is acknowledged in one flush.
            self.transmit_soon()

    def error_received(self, exc: Exception) -> None:
        self.log.debug("udp error", error=str(exc))
        code = exc.errno if isinstance(exc, OSError) else None
        if self._owns_transport and code in MIGRATE_ERRNOS:
            self._migrate_soon(str(exc))
            return
        if self._owns_transport and code == errno.EMSGSIZE:
            self._path_mtu_changed()
            return
        if isinstance(exc, ConnectionRefusedError):
            # ICMP port unreachable on our connected socket: nobody listens there. Fail fast
            # instead of at the handshake or idle timeout; once connected, only after several
            # in a row with nothing received (ICMP is unauthenticated, RFC 9000 §14.2.1 asks
            # for care), and the pool reconnects anyway.
            self._refused += 1
            if not self._connected.done() or self._refused >= MAX_ICMP_REFUSED:
                self.close(f"peer unreachable: {exc}", CLOSE_INTERNAL)
                self._terminated(f"peer unreachable: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self._terminated(f"socket closed: {exc}" if exc else "socket closed")

    # --- client socket: migration and path MTU -------------------------------------------------

    def _migrate_soon(self, why: str) -> None:
        if self._migrating is not None or self.closed:
            return
        # Deferred: the error arrives from inside a send, in the middle of `transmit`.
        self._migrating = self._loop.call_soon(self._migrate, why)

    def _migrate(self, why: str) -> None:
        """Move to a fresh socket connected to the same peer (module docstring)."""
        try:
            old = self._transport
            peer = self._peer
            if old is None or peer is None or self.closed:
                return
            family = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
            try:
                sock = quic_socket.open_client_socket(family, peer)
            except OSError as e:
                # No route at all yet: the next failed send tries again, and the idle timeout
                # ends the connection if the network never comes back.
                self.log.warning("tunnel migration failed", reason=str(e), trigger=why)
                return
            new_local = quic_socket.local_address(sock)
            if new_local.rsplit(":", 1)[0] == self.local_address.rsplit(":", 1)[0]:
                sock.close()  # same source address: nothing to migrate to (yet)
                return
            transport = quic_udp.open_endpoint(
                sock, ClientSocket(self), offload=self.settings.udp_offload
            )
            if self.closed:
                transport.close()
                return
            old_local = self.local_address
            self.use_client_socket(transport, peer)
            old.close()  # ClientSocket: its connection_lost no longer reaches us
            self.quic.change_connection_id()
            self.counters["migrations"] += 1
            self._path_mtu_changed()
            self.log.info(
                "tunnel migrated", old_local=old_local, new_local=self.local_address, trigger=why
            )
            self.transmit()
        finally:
            self._migrating = None

    def _path_mtu_changed(self) -> None:
        sock = self._transport.get_extra_info("socket") if self._transport else None
        if sock is None:
            return
        size = quic_socket.datagram_size(sock, self.settings.max_datagram_size)
        if size != self.quic.max_datagram_size:
            self.log.info("tunnel datagram size changed", old=self.quic.max_datagram_size, new=size)
            self.quic.set_max_datagram_size(size)
            self.transmit_soon()

    # --- driver ------------------------------------------------------------------------------

    def transmit_soon(self) -> None:
        if self._transmit_handle is None:
            self._transmit_handle = self._loop.call_soon(self.transmit)

    def _flush_later(self) -> None:
        if self._transmit_handle is None and self._flush_handle is None:
            self._flush_handle = self._loop.call_later(LAZY_FLUSH, self.transmit)

    def _send(self, datagrams: list[tuple[bytes, NetworkAddress]]) -> None:
        send = getattr(self._transport, "send_batch", None)
        if send is None:  # a plain asyncio transport
            for data, addr in datagrams:
                self._transport.sendto(data, None if self._owns_transport else addr)
        elif self._owns_transport:  # a connected UDP socket: the kernel knows the peer
            send([data for data, _ in datagrams])
        else:
            _send_grouped(send, datagrams)

    def transmit(self) -> None:
        for handle in (self._transmit_handle, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._transmit_handle = self._flush_handle = None
        if self._transport is None or self.closed or self._transport.is_closing():
            return
        datagrams = self.quic.datagrams_to_send(now=_clock())
        if datagrams:
            self._send(datagrams)  # before any bookkeeping: it is what the peer waits for
        if self._acking is not None and self._acking.handle_deferred_acks():  # after the send
            self._process_events()  # e.g. PingAcknowledged
            if self.closed or self._transport.is_closing():
                return
            datagrams = self.quic.datagrams_to_send(now=_clock())  # what they released
            if datagrams:
                self._send(datagrams)
        self._arm_timer()
        if self._watched:
            self._check_writable()

    def _arm_timer(self) -> None:
        timer_at = self.quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            if timer_at - _clock() < TIMER_GRANULARITY and timer_at == self.quic.pacing_at:
                # Event-loop timers wake at millisecond granularity at best, and aioquic's
                # pacer releases at most 16 datagrams per wake-up: sleeping for a sub-ms
                # pacing gap would cap a stream at ~16 datagrams/ms. Yield to I/O instead.
                # Only for pacing: spinning until the 1 ms ACK-delay timer burned a CPU
                # after every received packet, and a late ACK costs nothing.
                self._timer = self._loop.call_soon(self._handle_timer)
            else:
                self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at

    def _handle_timer(self) -> None:
        # The real time, even when woken early (sub-ms timers, see `transmit`): pretending
        # it is `_timer_at` would run aioquic's clock ahead and defeat pacing and RTT samples.
        now = _clock()
        self._timer = None
        self._timer_at = None
        self.quic.handle_timer(now=now)
        self._process_events()
        self.transmit()

    def _process_events(self) -> None:
        while (event := self.quic.next_event()) is not None:
            match event:
                case events.StreamDataReceived():
                    self._on_stream_data(event)
                case events.StreamReset():
                    self._abort_stream(
                        event.stream_id, f"peer reset the stream ({event.error_code})", True
                    )
                case events.StopSendingReceived():
                    self._stop_sending(event.stream_id, event.error_code)
                case events.HandshakeCompleted():
                    self._on_handshake(event)
                case events.ConnectionTerminated():
                    reason = event.reason_phrase or f"error 0x{event.error_code:x}"
                    self._terminated(self.close_reason or f"closed by peer: {reason}")
                case events.ConnectionIdIssued():
                    self.on_cid_issued(event.connection_id)
                case events.ConnectionIdRetired():
                    self.on_cid_retired(event.connection_id)
                case events.PingAcknowledged(uid):
                    if self.health.answered(uid, _clock()):
                        self.rtt = self.health.rtt
                        self.counters["probes_answered"] += 1
                        self._health_changed()
                case events.ProtocolNegotiated():
                    pass
                case events.DatagramFrameReceived():
                    pass  # we never advertise DATAGRAM support; aioquic refuses them anyway
                case _:
                    raise AssertionError(f"unhandled QUIC event {event!r}")

    def _on_handshake(self, event: events.HandshakeCompleted) -> None:
        try:
            if event.alpn_protocol != ALPN:
                raise VerificationError(f"peer negotiated ALPN {event.alpn_protocol!r}")
            identity = self.quic.authenticated_peer()
        except VerificationError as e:
            self.log.warning("tunnel handshake refused", reason=str(e))
            self.close(f"unauthenticated: {e}", CLOSE_UNAUTHENTICATED)
            self._fail_connected(TunnelError(f"peer not authenticated: {e}"))
            return
        self.peer_identity = identity
        if self._identify is not None:
            self.peer_cluster = self._identify(identity)
        self.log = self.log.bind(peer=self.peer_cluster or identity.uri)
        self.quic.log = self.log
        self.log.info("tunnel connected", peer_identity=identity.uri)
        if not self._connected.done():
            self._connected.set_result(None)
        if self.quic.configuration.is_client:
            self.health.seed_rtt(_clock() - self._dialled_at)
            self._schedule_keepalive()

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            stream = self._accept_stream(event.stream_id)
            if stream is None:
                return
        stream._on_data(event.data, event.end_stream)

    def _accept_stream(self, stream_id: int) -> TunnelStream | None:
        is_peer_initiated = bool(stream_id & 1) != (not self.quic.configuration.is_client)
        if (
            self._stream_handler is None
            or not is_peer_initiated
            or stream_id & 2  # unidirectional: not part of the tunnel protocol
            or stream_id < self._next_peer_stream
            or not self.connected
        ):
            return None  # a finished stream's late data, or not ours to accept
        self._next_peer_stream = stream_id + 4
        stream = TunnelStream(self, stream_id)
        self.streams[stream_id] = stream
        self.counters["streams"] += 1
        stream.attach(HeaderPhase(stream, self._stream_handler))
        return stream

    def _abort_stream(self, stream_id: int, reason: str, recv_finished: bool = False) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream._on_abort(reason, recv_finished=recv_finished)
        self.transmit_soon()

    def _stop_sending(self, stream_id: int, code: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if stream._reply is not None and not stream._reply.done():
            # A refusing peer sends its reply, FIN and STOP_SENDING together, and aioquic
            # writes STOP_SENDING first in a packet: keep reading, the reply is coming.
            stream.send_done = True  # aioquic already reset our sending side (RFC 9000 §3.5)
            self.stream_maybe_done(stream)
            return
        self._abort_stream(stream_id, f"peer stopped reading ({code})")

    def stream_maybe_done(self, stream: TunnelStream) -> None:
        if stream.send_done and stream.recv_done:
            self.streams.pop(stream.id, None)
            self._watched.discard(stream)
            self.quic.release(stream.id)
            if self.retiring and not self.streams:
                self.close("retired")

    def watch(self, stream: TunnelStream) -> None:
        self._watched.add(stream)
        self.transmit_soon()

    def _check_writable(self) -> None:
        low = self.settings.send_low_water
        for stream in list(self._watched):
            if stream.backlog() <= low:
                self._watched.discard(stream)
                stream._watching = False
                if stream._sink is not None:
                    stream._sink.stream_writable()

    def _fail_connected(self, exc: TunnelError) -> None:
        if not self._connected.done():
            self._connected.set_exception(exc)
            self._connected.exception()  # mark retrieved: on a server nobody waits for it

    def _schedule_keepalive(self) -> None:
        s = self.settings
        interval = min(s.keepalive_interval or s.health.probe_interval, s.health.probe_interval)
        self._keepalive = self._loop.call_later(interval, self._ping)

    def _ping(self) -> None:
        if self.closed or self.retiring:
            return
        uid = self.health.tick(_clock())
        if self._health_changed():
            return
        self._send_probe(uid)
        self._schedule_keepalive()

    def _send_probe(self, uid: int) -> None:
        self.counters["probes"] += 1
        self.quic.send_ping(uid)
        self.transmit()

    def _health_changed(self) -> bool:
        """Act on the probes' verdict (`gateway.health`); True if the connection was closed:
        at once, not after aioquic's closing period, so its streams reset now and the pool
        re-dials."""
        reason = self.health.close_reason(self.log)
        if reason is None:
            return False
        self.close(reason, CLOSE_INTERNAL)
        self._terminated(reason)
        return True

    def _cancel_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    def _terminated(self, reason: str) -> None:
        if self.closed:
            return
        self.close_reason = self.close_reason or reason
        self._closed.set()
        self._cancel_keepalive()
        self._watch.cancel()
        for handle in (self._timer, self._transmit_handle, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._timer = self._transmit_handle = self._flush_handle = None
        self._fail_connected(TunnelError(f"tunnel connection failed: {reason}"))
        if self._migrating is not None:
            self._migrating.cancel()
        for stream in list(self.streams.values()):
            stream._on_abort(f"tunnel connection closed: {reason}")
        self.streams.clear()
        self._watched.clear()
        self.log.info("tunnel connection closed", reason=self.close_reason)
        if self._owns_transport and self._transport is not None:
            self._transport.close()
        self.on_closed(self)


async def connect(
    host: str,
    port: int,
    *,
    configuration: QuicConfiguration,
    policy: PeerPolicy,
    settings: TunnelSettings,
    log: Any = _log,
    identify: Callable[[SpiffeId], str] | None = None,
) -> TunnelConnection:
    """Open and authenticate a client tunnel connection (raises TunnelError)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as e:
        raise TunnelError(f"cannot resolve {host}: {e}") from e
    family, _, _, _, addr = infos[0]
    try:
        sock = quic_socket.open_client_socket(family, addr)
    except OSError as e:
        raise TunnelError(f"cannot open a UDP socket to {host}:{port}: {e}") from e
    # The datagram size must be known before the connection exists: it sizes the Initial
    # packets and goes into our transport parameters.
    configuration = copy.copy(configuration)
    configuration.max_datagram_size = quic_socket.datagram_size(
        sock, configuration.max_datagram_size
    )
    quic = new_connection(
        configuration=configuration,
        peer_policy=policy,
        max_streams=settings.max_streams,
        lone_ack_delay=settings.lone_ack_delay,
    )
    conn = TunnelConnection(quic, settings, log=log, identify=identify)
    transport = quic_udp.open_endpoint(sock, ClientSocket(conn), offload=settings.udp_offload)
    conn.use_client_socket(transport, addr)
    conn.connect(addr)
    try:
        async with asyncio.timeout(settings.handshake_timeout):
            await conn.wait_connected()
    except TimeoutError as e:
        limit = settings.handshake_timeout
        conn.close(f"handshake timed out after {limit:g}s", CLOSE_INTERNAL)
        conn._terminated("handshake timed out")  # CONNECTION_CLOSE is sent: free the socket
        raise TunnelTimeoutError(f"QUIC handshake timed out after {limit:g}s") from e
    except BaseException:  # refused, or the caller gave up (cancelled): free the socket
        conn.close("handshake failed")
        conn._terminated("handshake failed")
        raise
    return conn


def _send_grouped(send: Callable[..., None], datagrams: list[tuple[bytes, NetworkAddress]]) -> None:
    """A shared (server) socket: one batch per run of datagrams to the same address (a path
    probe during a migration goes elsewhere than the rest)."""
    start = 0
    for i in range(1, len(datagrams) + 1):
        if i == len(datagrams) or datagrams[i][1] != datagrams[start][1]:
            send([data for data, _ in datagrams[start:i]], datagrams[start][1])
            start = i
