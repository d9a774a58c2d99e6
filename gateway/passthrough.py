"""The `passthrough` tunnel transport: no outer encryption, one TCP connection per call.

The egress connects to the peer gateway's passthrough port, sends the cleartext `StreamHeader`
frame naming the destination, reads the `StreamReply`, then both gateways relay the inner
end-to-end mutual-TLS bytes of the sidecars (Istio's AUTO_PASSTHROUGH model). The inner TLS is
end to end, so a gateway still reads nothing of a call; what is given up is the gateways'
authentication of each other: anyone who reaches the passthrough port may ask the ingress for a
connection to a local endpoint's sidecar inbound port, which then demands a workload SVID of the
federation (so the workloads stay protected, the gateway no longer filters by peer cluster).
It is off unless a listen port is configured, and documented as such (docs/transports.md).

`PassthroughStream` is a TCP connection (an `asyncio.Protocol`) implementing
`gateway.transport.Stream`: a TCP FIN is the stream's FIN, a TCP reset is its reset;
backpressure is TCP's own (`pause_reading`, the transport's write-buffer marks).
Not here: routing (`gateway.ingress`), the relay to the sidecar side (`gateway.splice`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, cast

import structlog

from gateway.errors import TunnelError, TunnelTimeoutError
from gateway.transport import (
    BaseStream,
    HeaderPhase,
    PeerTarget,
    Stream,
    StreamHandler,
    TcpListener,
)

_log = structlog.get_logger("fedgate.gateway.passthrough")
_ids = itertools.count(1)
_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class PassthroughSettings:
    connect_timeout: float = 5.0
    header_timeout: float = 10.0  # a caller that names no destination in time is dropped
    max_connections: int = 4096
    send_high_water: int = 512 * 1024
    send_low_water: int = 128 * 1024
    zero_copy: bool = True  # once routed, relay with os.splice (`gateway.zerocopy`)


class PassthroughStream(BaseStream, asyncio.Protocol):
    """One call over its own TCP connection (client: the egress; server: the ingress)."""

    def __init__(
        self,
        settings: PassthroughSettings,
        counters: dict[str, int],
        log: Any,
        handler: StreamHandler | None = None,
        on_closed: Any = None,
    ) -> None:
        super().__init__()
        self.id = next(_ids)
        self.settings = settings
        self.log = log.bind(conn=f"p{self.id}")
        self._counters = counters
        self._handler = handler
        self._on_closed = on_closed
        self.transport: asyncio.Transport | None = None
        self._watching = False
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._deadline: asyncio.TimerHandle | None = None
        self.relay: Any = None  # a `zerocopy.SocketRelay` once the socket is handed over

    # --- Stream ------------------------------------------------------------------------------

    @property
    def high_water(self) -> int:
        return self.settings.send_high_water

    @property
    def peer_cluster(self) -> str:
        return ""  # unauthenticated by design

    @property
    def counters(self) -> dict[str, int]:
        return self._counters

    def _send(self, data: bytes, fin: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            self.send_done = True
            return
        if data:
            t.write(data)
        if fin and t.can_write_eof():
            t.write_eof()

    def _abort(self, code: int) -> None:
        self.send_done = self.recv_done = True
        if self.relay is not None and self.relay is not True:
            self.relay.fail("reset")
            return
        t = self.transport
        if t is not None and not t.is_closing():
            sock = t.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            t.abort()

    def _stop_reading(self) -> None:
        self.recv_done = True

    def _maybe_done(self) -> None:
        if self.send_done and self.recv_done and self.transport is not None:
            self.transport.close()  # flushes what is buffered first

    def backlog(self) -> int:
        t = self.transport
        return t.get_write_buffer_size() if t is not None else 0

    def notify_writable(self) -> None:
        if self.backlog() <= self.settings.send_low_water:
            asyncio.get_running_loop().call_soon(self._writable)
        else:
            self._watching = True

    def hold_credit(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def release_credit(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    # --- zero copy (gateway.splice hands both sockets to gateway.zerocopy) ---------------------

    @property
    def zero_copy(self) -> bool:
        return self.settings.zero_copy and self.transport is not None

    def detach_socket(self) -> int:
        """Give up the socket (a duplicate descriptor is returned) and its transport."""
        t = self.transport
        assert t is not None
        fd = os.dup(t.get_extra_info("socket").fileno())
        self.relay = True  # until the splice installs the relay itself
        t.close()
        return fd

    def relay_finished(self, outcome: str, sent: int, received: int) -> None:
        self.bytes_out += sent
        self.bytes_in += received
        self.send_done = self.recv_done = True
        if not self._closed.done():
            self._closed.set_result(None)
        if self._on_closed is not None:
            self._on_closed(self)

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = self.transport = cast(asyncio.Transport, transport)
        t.set_write_buffer_limits(self.settings.send_high_water, self.settings.send_low_water)
        sock = t.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = t.get_extra_info("peername")
        if peer:
            self.log = self.log.bind(peer_addr=f"{peer[0]}:{peer[1]}")
        if self._handler is not None:
            self._counters["streams"] = self._counters.get("streams", 0) + 1
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self.settings.header_timeout, self._no_header)
            self.attach(_Timed(self, HeaderPhase(self, self._handler)))

    def data_received(self, data: bytes) -> None:
        self._on_data(data, False)
        if self._sink is None and len(self._pending) > self.settings.send_high_water:
            self.hold_credit()  # until a sink is attached (`attach` releases)

    def eof_received(self) -> bool:
        self._on_data(b"", True)
        return True  # our direction may still be flowing (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self.relay is not None:
            return  # the socket lives on in the relay
        if not (self.send_done and self.recv_done):
            self.send_done = self.recv_done = True
            self._on_abort(f"tunnel connection lost: {exc}" if exc else "tunnel connection closed")
        if not self._closed.done():
            self._closed.set_result(None)
        if self._on_closed is not None:
            self._on_closed(self)

    def pause_writing(self) -> None:
        pass  # `backlog()` reads the buffer size; `resume_writing` tells the sink

    def resume_writing(self) -> None:
        if self._watching:
            self._writable()

    def _writable(self) -> None:
        self._watching = False
        if self._sink is not None:
            self._sink.stream_writable()

    def _no_header(self) -> None:
        self._deadline = None
        if isinstance(self._sink, _Timed):
            self.log.warning("tunnel stream refused", reason="no stream header in time")
            self._counters["bad_headers"] = self._counters.get("bad_headers", 0) + 1
            self.refuse(408, f"no stream header within {self.settings.header_timeout:g}s")

    def header_done(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


class _Timed:
    """The header phase, cancelling the header deadline once it decided."""

    def __init__(self, stream: PassthroughStream, phase: HeaderPhase) -> None:
        self._stream = stream
        self._phase = phase

    def stream_data(self, data: bytes) -> None:
        self._phase.stream_data(data)
        if self._stream._sink is not self:
            self._stream.header_done()

    def stream_eof(self) -> None:
        self._stream.header_done()
        self._phase.stream_eof()

    def stream_reset(self, reason: str) -> None:
        self._stream.header_done()

    def stream_writable(self) -> None:
        pass


class PassthroughServer(TcpListener):
    """Listens on TCP; each connection is one stream whose cleartext header names its target."""

    def __init__(
        self, settings: PassthroughSettings, stream_handler: StreamHandler, log: Any = _log
    ) -> None:
        self.settings = settings
        self._handler = stream_handler
        self.log = log
        self.streams: set[PassthroughStream] = set()
        self.counters: dict[str, int] = {"streams": 0, "bad_headers": 0, "refused": 0}

    def _protocol(self) -> asyncio.Protocol:
        if self._closing or len(self.streams) >= self.settings.max_connections:
            self.counters["refused"] += 1
            return _Abort()
        stream = PassthroughStream(
            self.settings, self.counters, self.log, self._handler, self.streams.discard
        )
        self.streams.add(stream)
        return stream

    def drain(self) -> None:
        self.stop_listening()

    async def aclose(self) -> None:
        self.drain()
        for stream in list(self.streams):
            stream.reset("gateway shutting down")
        await self.wait_stopped()


class _Abort(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()


class PassthroughDialer:
    """The egress side: one TCP connection per call (implements `StreamDialer`)."""

    def __init__(self, settings: PassthroughSettings, log: Any = _log) -> None:
        self.settings = settings
        self.log = log
        self.active: set[PassthroughStream] = set()
        self.counters: dict[str, int] = {"connects": 0, "connect_failures": 0, "streams": 0}

    async def open_stream(self, target: PeerTarget) -> Stream:
        loop = asyncio.get_running_loop()
        limit = self.settings.connect_timeout
        try:
            async with asyncio.timeout(limit):
                _, stream = await loop.create_connection(
                    lambda: PassthroughStream(
                        self.settings,
                        self.counters,
                        self.log.bind(peer=target.cluster),
                        on_closed=self.active.discard,
                    ),
                    target.host,
                    target.port,
                )
        except TimeoutError as e:
            self.counters["connect_failures"] += 1
            raise TunnelTimeoutError(f"connect to {target.host}:{target.port} timed out") from e
        except OSError as e:
            self.counters["connect_failures"] += 1
            raise TunnelError(
                f"cannot connect to {target.host}:{target.port}: {e.strerror or e}"
            ) from e
        self.counters["connects"] += 1
        self.counters["streams"] += 1
        self.active.add(stream)
        return stream

    def forget_missing(self, clusters: set[str]) -> None:
        pass  # nothing is kept between calls

    def status(self) -> dict[str, Any]:
        return {"open_streams": len(self.active), **self.counters}

    async def aclose(self, grace: float = 1.0) -> None:
        for stream in list(self.active):
            stream.reset("gateway shutting down")
