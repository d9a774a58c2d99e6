"""The `tls` tunnel transport: TLS 1.3 over TCP between gateways, streams multiplexed inside
(`mesh.mux`), a thin asyncio driver around the mux core and an `ssl.SSLObject` on memory
BIOs (model: `sidecar.tlsio`; not `loop.start_tls`, so every handshake failure is ours to log
with its reason, and the peer is authorized before a single stream byte is read).

Handshake and authentication (both sides, before any stream):
* OpenSSL verifies the chain against the contexts' roots (`ca.tls`; the client trusts only the
  peer cluster's own roots) and requires a client certificate;
* then `ca.tls.peer_identity` applies the trust-domain-scoped SPIFFE check against the current
  bundle and `PeerPolicy.authorize` decides (the same `gateway.quic_mtls.PeerPolicy` as QUIC);
* the server answers an accepted client with READY; the client counts as connected only then,
  so a refused client never opens a stream. A refusal is logged ("tunnel handshake refused")
  with its reason, and the server tells an authenticated-but-refused client why (GOAWAY).

Each call is one mux stream (`MuxStream`), which implements `gateway.transport.Stream`.
Backpressure: a stream's backlog is what waits for the peer's credit, plus the connection's
TCP write buffer while it is above its high-water mark; receive credit is held while the sink's
TCP write buffer is full (`hold_credit`/`release_credit`). Health: the client PINGs every
`health.probe_interval` (`gateway.health` decides; a connection that misses
`unhealthy_threshold` probes in a row is closed, its streams reset, and the pool re-dials),
and at once when the peer is silent while streams wait (`gateway.liveness`);
either side closes a connection that received nothing for `idle_timeout`. Not here: the
listener and `connect` (`gateway.tls_server`), pooling (`gateway.pool`), the TCP side
(`gateway.splice`), nor what `sidecar.smux` shares (`mesh.muxconn.MuxDriver`: the streams'
table, backpressure and events, the send side's batching, docs/transports.md "Data path").

Over the 450-line aim: the handshake, the record I/O and the probes share one connection's
state and timers; the rules they apply already live apart (`mesh.mux`, `gateway.health`,
`gateway.liveness`), what is left is their wiring to one socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import structlog

from ca.errors import CertificateExpiredError, VerificationError
from ca.tls import peer_identity
from ca.verify import verify_chain
from gateway.errors import TunnelError
from gateway.health import HealthSettings, ProbeHealth
from gateway.liveness import LinkWatch
from gateway.mux_stream import MuxStream
from gateway.quic_mtls import PeerPolicy
from gateway.transport import HeaderPhase, StreamHandler
from mesh import mux
from mesh.muxconn import MuxDriver
from mesh.naming import SpiffeId

ALPN = "fedgate-mux/1"
READ_SIZE = 256 * 1024
_log = structlog.get_logger("fedgate.gateway.tls")
_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class TlsTunnelSettings:
    """`tls` transport tuning. Buffering per stream is bounded by `window` (receive) and the
    high-water marks (send)."""

    handshake_timeout: float = 5.0
    reply_timeout: float = 10.0
    idle_timeout: float = 30.0
    keepalive_interval: float = 10.0  # server side: how often the idle timeout is checked
    window: int = 1024 * 1024
    max_streams: int = 1024
    max_connections: int = 256
    connections_per_peer: int = 2
    send_high_water: int = 512 * 1024
    send_low_water: int = 128 * 1024
    health: HealthSettings = field(default_factory=HealthSettings)  # client side probes


def tls_reason(e: ssl.SSLError) -> str:
    """A short reason for a TLS failure, as operators search for it in logs."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate refused: {e.verify_message}"
    if e.reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
        return "no client certificate"
    if e.reason and "ALERT" in e.reason:
        return f"tls alert: {e.reason.lower()}"
    return f"tls error: {e.reason or e}"


class TlsTunnelConnection(MuxDriver[MuxStream], asyncio.BufferedProtocol):
    """Drives one TLS connection carrying mux streams (client or server side)."""

    def __init__(
        self,
        *,
        is_client: bool,
        context: ssl.SSLContext,
        policy: PeerPolicy,
        settings: TlsTunnelSettings,
        server_hostname: str | None = None,
        stream_handler: StreamHandler | None = None,
        identify: Callable[[SpiffeId], str] | None = None,
        log: Any = _log,
    ) -> None:
        super().__init__(
            mux.MuxConnection(
                is_client=is_client, window=settings.window, max_streams=settings.max_streams
            )
        )
        self.settings = settings
        self.log = log.bind(conn=f"t{next(_ids)}")
        self.peer_identity: SpiffeId | None = None
        self.peer_cluster = ""
        # probes: keepalive PINGs sent (client side); probes_answered: their PONGs, in time.
        self.counters: dict[str, int] = {
            "streams": 0,
            "bad_headers": 0,
            "probes": 0,
            "probes_answered": 0,
        }
        self.on_closed: Callable[[Any], None] = lambda conn: None
        self._is_client = is_client
        self._policy = policy
        self._handler = stream_handler
        self._identify = identify
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, not is_client, server_hostname)
        self._records = (self._ssl.write, self._outgoing.read)
        self._sealing = False  # no mux frame before the handshake is done
        self._handshake_done = False
        self._rview = memoryview(bytearray(READ_SIZE))
        # Ciphertext is read into this (`get_buffer`), not into a new `bytes` per read: it is
        # copied into the incoming BIO anyway.
        self._inview = memoryview(bytearray(READ_SIZE))
        self._peer_der = b""
        self._connected: asyncio.Future[None] = self._loop.create_future()
        self._closed = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._last_rx = self._loop.time()
        self._dialled_at = time.monotonic()
        self.health = ProbeHealth(settings.health)  # client side: our probes of the peer
        self.rtt: float | None = None  # seconds, smoothed, from the probes (client side)
        # Client side: a silent peer while streams wait is probed at once (`gateway.liveness`).
        self._watch = LinkWatch(self.health, self._ping, self.streams, self._health_changed)

    # --- state ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.done() and not self._connected.exception()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def usable(self) -> bool:
        return (
            self.connected
            and not self.closed
            and not self.retiring
            and not self.close_reason
            and not self.mux.goaway_received
            and self.mux.error is None
            and self.health.healthy
        )

    async def wait_connected(self) -> None:
        await asyncio.shield(self._connected)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # --- API --------------------------------------------------------------------------------

    def open_stream(self) -> MuxStream:
        if not self.usable:
            raise TunnelError(f"tunnel connection is closing ({self.close_reason or 'retired'})")
        try:
            stream_id = self.mux.open_stream()
        except mux.MuxError as e:
            raise TunnelError(f"tunnel connection takes no new streams: {e}") from e
        self._watch.opened()
        return self._add(stream_id)

    def suspect(self) -> None:
        """Probe the link now, with the short timeout of a suspect link (`gateway.liveness`)."""
        if self._is_client and self.connected and not self.closed:
            self._watch.suspect()

    def drain(self, reason: str = "draining") -> None:
        """Server side: the peer opens no new stream here (GOAWAY); close once idle."""
        self.mux.goaway(reason)
        self.flush_soon()
        self.retire()

    def revalidate(self) -> str | None:
        """Re-check the peer against the current bundle and policy; close if it fails."""
        if not self.connected or self.closed or not self._peer_der:
            return None
        try:
            identity = verify_chain([self._peer_der], self._policy.bundle(), self._policy.now())
            denied = self._policy.authorize(identity)
        except CertificateExpiredError:
            # Expired after a routine renewal, not revoked: let open streams finish and move
            # new calls to a fresh handshake (the dialler retires, the acceptor sends GOAWAY).
            if self._is_client:
                self.retire()
            else:
                self.drain("peer certificate expired")
            return None
        except VerificationError as e:
            denied = str(e)
        if denied is not None:
            self.log.warning("tunnel peer no longer trusted", reason=denied)
            self.close(f"peer no longer trusted: {denied}")
        return denied

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if peer:
            self.log = self.log.bind(peer_addr=f"{peer[0]}:{peer[1]}")
        self._timer = self._loop.call_later(self.settings.handshake_timeout, self._tick)
        self._dialled_at = time.monotonic()
        if self._is_client:
            self._advance_handshake()
            self._flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._inview

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._inview[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.closed:
            return
        self._last_rx = self._loop.time()
        self._watch.last_heard = time.monotonic()
        self._incoming.write(data)
        if not self._handshake_done:
            self._advance_handshake()
            if not self._handshake_done or self.closed:
                self._flush()
                return
        self._in_receive = True
        try:
            self._read_records()
        finally:
            self._in_receive = False
        if not self.closed:
            self._process_events()
            self._flush()

    def eof_received(self) -> bool:
        self._terminated(self.close_reason or "peer closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self._terminated(f"connection lost: {exc}" if exc else "connection closed by peer")

    # --- driver ---------------------------------------------------------------------------------

    def _advance_handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return
        except ssl.SSLError as e:
            self._refuse(tls_reason(e), tell_peer=False)
            return
        # Frames may go out from here: a refusal's GOAWAY; streams only once connected.
        self._handshake_done = self._sealing = True
        try:
            if self._ssl.selected_alpn_protocol() != ALPN:
                raise VerificationError(
                    f"peer negotiated ALPN {self._ssl.selected_alpn_protocol()}"
                )
            self._peer_der = self._ssl.getpeercert(binary_form=True) or b""
            identity = peer_identity(self._ssl, self._policy.bundle())
            denied = self._policy.authorize(identity)
        except VerificationError as e:
            self._refuse(str(e), tell_peer=True)
            return
        except Exception as e:  # a policy bug must fail closed, never escape the driver
            self._refuse(f"peer check failed: {e!r}", tell_peer=True)
            return
        if denied is not None:
            self._refuse(f"{identity} not authorized: {denied}", tell_peer=True)
            return
        self.peer_identity = identity
        if self._identify is not None:
            self.peer_cluster = self._identify(identity)
        self.log = self.log.bind(peer=self.peer_cluster or identity.uri)
        if not self._is_client:
            self.mux.ready()
            self._set_connected()
        # The client is connected once the server's READY arrives (`_on_event`).

    def _set_connected(self) -> None:
        uri = self.peer_identity.uri if self.peer_identity else None
        self.log.info("tunnel connected", peer_identity=uri, transport="tls")
        if not self._connected.done():
            self._connected.set_result(None)
        if self._is_client:
            self.health.seed_rtt(time.monotonic() - self._dialled_at)
        self._arm_timer()

    def _refuse(self, reason: str, *, tell_peer: bool) -> None:
        side = "server" if self._is_client else "client"
        self.log.warning("tunnel handshake refused", reason=f"{side}: {reason}", transport="tls")
        self.close_reason = f"unauthenticated: {reason}"
        if tell_peer:
            self.mux.goaway(f"refused: {reason}")
        self._flush()
        self._terminated(self.close_reason)

    def _read_records(self) -> None:
        """Decrypt everything buffered into one preallocated buffer, then hand it to the mux in
        one piece: one frame parse and one sink write per batch instead of per 16 KiB record
        (measured: ~2.5x fewer Python calls per byte on the receive side). The mux gets a view
        of the buffer and copies each payload out once (a `bytes` of the batch first, then
        slices of it, was two copies)."""
        view = self._rview
        size = len(view)
        read = self._ssl.read
        used = 0
        ended = ""
        while True:
            if used == size:
                self.mux.receive_data(view[:used])
                used = 0
            try:
                n = cast(int, read(size - used, view[used:]))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                n = 0
            except ssl.SSLError as e:
                ended = tls_reason(e)
                break
            if not n:
                ended = self.close_reason or "peer closed the TLS session"
                break
            used += n
        if used:
            self.mux.receive_data(view[:used])
        if ended:
            self._process_events()  # what arrived before the end is still delivered
            self._terminated(ended)

    def _on_event(self, event: mux.Event) -> bool:
        match event:
            case mux.PeerReady():
                if self._is_client and self.peer_identity is not None:
                    self._set_connected()
            case mux.GoAway(_, reason):
                self.log.info("peer is going away", reason=reason)
                if not self.connected:
                    self._terminated(reason or "peer refused the connection")
                    return True
                self.retire()
            case mux.ConnectionFailed(reason):
                self.log.warning("tunnel protocol error", reason=reason)
                self._flush()
                self._terminated(f"protocol error: {reason}")
                return True
            case mux.PingAcked(value):
                # time.monotonic, not the loop's clock: uvloop's has millisecond
                # resolution, and a LAN round trip is well under a millisecond.
                if self.health.answered(value, time.monotonic()):
                    self.rtt = self.health.rtt
                    self.counters["probes_answered"] += 1
                    self._health_changed()
            case _:
                raise AssertionError(f"unhandled mux event {event!r}")
        return False

    def _accept(self, stream_id: int) -> None:
        if self._handler is None or not self.connected:
            self.mux.reset_stream(stream_id, mux.RESET_REFUSED)
            return
        stream = self._add(stream_id)
        stream.attach(HeaderPhase(stream, self._handler))

    def _add(self, stream_id: int) -> MuxStream:
        stream = self.streams[stream_id] = MuxStream(self, stream_id)
        self.counters["streams"] += 1
        return stream

    def _tls_failure(self, e: OSError) -> str:
        return tls_reason(e) if isinstance(e, ssl.SSLError) else str(e)

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        interval = min(self.settings.keepalive_interval, self.settings.idle_timeout / 2)
        if self._is_client:
            interval = min(interval, self.settings.health.probe_interval)
        self._timer = self._loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.closed:
            return
        if not self.connected:
            limit = self.settings.handshake_timeout
            self.log.warning("tunnel handshake refused", reason=f"not completed in {limit:g}s")
            self._terminated(f"handshake not completed in {limit:g}s")
            return
        if self._loop.time() - self._last_rx > self.settings.idle_timeout:
            self.close(f"idle for {self.settings.idle_timeout:g}s")
            return
        if self._is_client:
            probe = self.health.tick(time.monotonic())
            if self._health_changed():
                return
            self._ping(probe)
        self._arm_timer()

    def _ping(self, probe: int) -> None:
        self.counters["probes"] += 1
        self.mux.ping(probe)
        self._flush()

    def _health_changed(self) -> bool:
        """Act on the probes' verdict (`gateway.health`); True if the connection was closed."""
        reason = self.health.close_reason(self.log)
        if reason is None:
            return False
        self.close(reason)
        if self._transport is not None:
            # The peer reads nothing: a graceful close would keep the socket (and what is
            # queued for it) until it does. Reset it.
            self._transport.abort()
        return True

    def _terminated(self, reason: str) -> None:
        if self.closed:
            return
        self._watch.cancel()
        streams = self._end(reason)
        self._closed.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._connected.done():
            self._connected.set_exception(TunnelError(f"tunnel connection failed: {reason}"))
            self._connected.exception()  # mark retrieved: on a server nobody waits for it
        for stream in streams:
            stream.failed(reason)
        if self.peer_identity is not None:
            self.log.info("tunnel connection closed", reason=self.close_reason)
        if self._transport is not None:
            self._transport.close()  # flushes a GOAWAY or alert queued before
        self.on_closed(self)
