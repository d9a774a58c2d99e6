"""The tunnel interface every transport implements, and the stream logic they share.

A *tunnel stream* carries one call between two gateways: the opener writes a `StreamHeader`
frame, the other side answers with a `StreamReply` frame, then opaque bytes flow both ways with
half-close, and either side may reset. The egress, the ingress and `gateway.splice` use only the
methods of `Stream` below, so they work unchanged over every transport:

* `quic` (`gateway.tunnel`, `gateway.stream`): QUIC streams of one long-lived connection;
* `tls` (`gateway.tls_tunnel`, `gateway.tls_server`, `gateway.mux_stream`, `mesh.mux`):
  streams multiplexed inside a small pool of long-lived TLS 1.3 connections;
* `passthrough` (`gateway.passthrough`, `gateway.zerocopy`): one TCP connection per call, no
  outer encryption, relayed with os.splice once routed.

docs/transports.md describes them, their framing and their limits, with figures.

`BaseStream` holds what does not depend on the transport: bytes received before a sink is
attached (bounded by the transport's flow control), reading the peer's reply, delivering FIN
and resets to the sink, and the server side's header phase (`HeaderPhase`). A transport
subclasses it and implements the `_send`/`_abort`/credit hooks.

`StreamDialer` is how the egress opens a stream to a peer cluster, whatever the transport
(a `PeerPool` for the multiplexed transports, `PassthroughDialer` for passthrough).

Not here: connections, listeners, pooling, TCP relaying.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.errors import TunnelError
from gateway.framing import FrameReader, HeaderAccepted, HeaderGate, HeaderRefused, read_reply
from mesh.codec import StreamHeader, StreamReply, encode_reply
from mesh.errors import CodecError

TRANSPORTS = ("tls", "quic", "passthrough")
# TCP listeners (egress, tls, passthrough): a burst of new calls must not overflow the accept
# queue (asyncio's default is 100; a dropped SYN costs the caller a 1 s retransmission).
LISTEN_BACKLOG = 4096


class TcpListener:
    """The TCP listening socket both TCP transports (tls, passthrough) share.

    Subclasses supply `_protocol`, the factory asyncio calls per accepted connection.
    """

    _server: asyncio.Server | None = None
    _closing: bool = False

    def _protocol(self) -> asyncio.BaseProtocol:
        raise NotImplementedError

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, host, port, reuse_port=reuse_port or None, backlog=LISTEN_BACKLOG
        )

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    def stop_listening(self) -> None:
        """Accept nothing new (connections already accepted carry on)."""
        self._closing = True
        if self._server is not None:
            self._server.close()

    async def wait_stopped(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


# Stream abort codes (QUIC RESET_STREAM / STOP_SENDING, mux RESET). Transport-neutral values.
RESET_ABORTED = 0x1  # the TCP side on this end failed or was reset
RESET_PROTOCOL = 0x2  # malformed header or reply


@dataclass(frozen=True, slots=True)
class PeerTarget:
    """Where a peer cluster's gateway listens for the transport its cluster publishes."""

    cluster: str
    host: str
    port: int
    trust_domain: str
    transport: str = "quic"


class StreamSink(Protocol):
    """Where a tunnel stream delivers what the peer sent."""

    def stream_data(self, data: bytes) -> None: ...

    def stream_eof(self) -> None: ...

    def stream_reset(self, reason: str) -> None: ...

    def stream_writable(self) -> None: ...


class Stream(Protocol):
    """What the egress, the ingress and the TCP relay use of a tunnel stream."""

    id: int
    bytes_in: int
    bytes_out: int
    send_done: bool
    recv_done: bool

    @property
    def high_water(self) -> int: ...

    @property
    def peer_cluster(self) -> str: ...

    def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...

    def reset(self, reason: str, code: int = RESET_ABORTED) -> None: ...

    def refuse(self, status: int, reason: str) -> None: ...

    def backlog(self) -> int: ...

    def notify_writable(self) -> None: ...

    def hold_credit(self) -> None: ...

    def release_credit(self) -> None: ...

    def attach(self, sink: StreamSink) -> None: ...

    async def read_reply(self) -> StreamReply: ...


StreamHandler = Callable[[Any, StreamHeader], None]
"""Server side: called once a stream's header has arrived; must attach a sink or refuse it."""


class StreamDialer(Protocol):
    """Opens a stream to a peer cluster's gateway (the header is written by the caller)."""

    async def open_stream(self, target: PeerTarget) -> Stream: ...

    def forget_missing(self, clusters: set[str]) -> None: ...

    def status(self) -> dict[str, Any]: ...

    async def aclose(self, grace: float = 1.0) -> None: ...


class SendMarks(Protocol):
    """A connection's send-side marks for its streams (the transports' settings)."""

    @property
    def send_high_water(self) -> int: ...

    @property
    def send_low_water(self) -> int: ...


class BaseStream:
    """Receive-side logic shared by every transport's stream (see the module docstring).

    Subclasses implement `_send(data, fin)`, `_abort(code)` (abort both directions on the
    wire), `_stop_reading()`, `_maybe_done()`, `backlog()`, `notify_writable()`,
    `hold_credit()`, `release_credit()`, and provide `high_water`, `peer_cluster`, `log`,
    `counters`.
    """

    id: int
    log: Any

    def __init__(self) -> None:
        self.recv_done = False  # FIN or reset received (or we stopped reading)
        self.send_done = False  # FIN or reset sent
        self.bytes_in = 0
        self.bytes_out = 0
        self._sink: StreamSink | None = None
        self._pending = bytearray()
        self._pending_eof = False
        self._pending_reset: str | None = None
        self._reply: asyncio.Future[StreamReply] | None = None
        self._reader: FrameReader | None = None

    # --- hooks ------------------------------------------------------------------------------

    @property
    def high_water(self) -> int:
        raise NotImplementedError

    @property
    def peer_cluster(self) -> str:
        raise NotImplementedError

    @property
    def counters(self) -> dict[str, int]:
        raise NotImplementedError

    def _send(self, data: bytes, fin: bool) -> None:
        raise NotImplementedError

    def _abort(self, code: int) -> None:
        """Abort what is still open of both directions on the wire; set send/recv_done."""
        raise NotImplementedError

    def _stop_reading(self) -> None:
        """After a refusal: we read no more of this stream."""
        raise NotImplementedError

    def _maybe_done(self) -> None:
        raise NotImplementedError

    def backlog(self) -> int:
        raise NotImplementedError

    def notify_writable(self) -> None:
        raise NotImplementedError

    def hold_credit(self) -> None:
        raise NotImplementedError

    def release_credit(self) -> None:
        raise NotImplementedError

    # --- sending ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.send_done or not data:
            return
        self.bytes_out += len(data)
        self._send(data, False)

    def write_eof(self) -> None:
        if self.send_done:
            return
        self._send(b"", True)
        self.send_done = True
        self._maybe_done()

    def reset(self, reason: str, code: int = RESET_ABORTED) -> None:
        """Abort both directions and drop the sink."""
        self._abort(code)
        self._sink = None
        self.log.debug("stream reset", stream=self.id, reason=reason)
        self._maybe_done()

    def refuse(self, status: int, reason: str) -> None:
        """Answer with an error reply and close the stream (we read no more of it)."""
        try:
            self.write(encode_reply(StreamReply(status, reason[:1000])))
        except CodecError:
            self.write(encode_reply(StreamReply(status, "refused")))
        self.write_eof()
        self._stop_reading()
        self._sink = None
        self._maybe_done()

    # --- receiving --------------------------------------------------------------------------

    def attach(self, sink: StreamSink) -> None:
        """Deliver everything received so far, then all that follows, to `sink`."""
        self._sink = sink
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            sink.stream_data(data)
        if self._pending_reset is not None:
            sink.stream_reset(self._pending_reset)
        elif self._pending_eof:
            sink.stream_eof()
        self.release_credit()

    async def read_reply(self) -> StreamReply:
        """Client side: wait for the peer's StreamReply (the caller bounds the wait); bytes
        after it stay pending until a sink is attached. Raises TunnelError.

        Call it right after writing the header, before yielding to the loop: bytes that
        arrived earlier would be taken for payload."""
        if self._pending_reset is not None:
            raise TunnelError(self._pending_reset)
        self._reply = asyncio.get_running_loop().create_future()
        self._reader = FrameReader()
        try:
            return await self._reply
        finally:
            self._reply = None
            self._reader = None

    def _reply_data(self, data: bytes) -> None:
        assert self._reply is not None
        assert self._reader is not None
        try:
            got = read_reply(self._reader, data)
        except CodecError as e:
            self._reply.set_exception(TunnelError(f"malformed stream reply: {e}"))
            self.reset(f"malformed stream reply: {e}", RESET_PROTOCOL)
            return
        if got is None:
            return
        reply, rest = got
        self._pending += rest
        self._reply.set_result(reply)

    def _on_data(self, data: bytes, fin: bool) -> None:
        self.bytes_in += len(data)
        if self._reply is not None and not self._reply.done():
            self._reply_data(data)
            if fin and not self._reply.done():
                self._reply.set_exception(TunnelError("stream ended before its reply"))
        elif self._sink is not None:
            if data:
                self._sink.stream_data(data)
        else:
            self._pending += data
        if fin:
            self.recv_done = True
            if self._sink is not None:
                self._sink.stream_eof()
            else:
                self._pending_eof = True
            self._maybe_done()

    def _on_abort(self, reason: str, *, recv_finished: bool = False) -> None:
        """The peer reset the stream or stopped reading, or the connection died."""
        if recv_finished:
            self.recv_done = True
        self._abort(RESET_ABORTED)
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(TunnelError(reason))
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.stream_reset(reason)
        else:
            self._pending_reset = reason
        self._maybe_done()


class HeaderPhase:
    """Server side sink until the stream header is complete (decisions in `HeaderGate`)."""

    def __init__(self, stream: BaseStream, handler: StreamHandler) -> None:
        self._stream = stream
        self._handler = handler
        self._gate = HeaderGate()

    def stream_data(self, data: bytes) -> None:
        self._decide(self._gate.feed(data))

    def stream_eof(self) -> None:
        self._decide(self._gate.eof())

    def _decide(self, outcome: HeaderAccepted | HeaderRefused | None) -> None:
        stream = self._stream
        match outcome:
            case None:
                pass
            case HeaderRefused(status, reason):
                stream.counters["bad_headers"] = stream.counters.get("bad_headers", 0) + 1
                stream.log.warning("tunnel stream refused", stream=stream.id, reason=reason)
                stream.refuse(status, reason)
            case HeaderAccepted(header, rest):
                stream._sink = None
                stream._pending += rest
                stream.hold_credit()
                self._handler(stream, header)
            case _:
                raise AssertionError(f"unknown header outcome {outcome!r}")

    def stream_reset(self, reason: str) -> None:
        pass

    def stream_writable(self) -> None:
        pass
