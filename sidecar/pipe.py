"""One proxied TCP connection as an asyncio protocol: optional TLS, bounded reads, splicing.

A `Conn` lives in two phases. First the handler coroutine drives it: `read_frame` buffers until
a bounded parser (CONNECT response head, stream header) accepts, and `start_tls` runs a TLS 1.3
handshake over the same socket. Then `splice(a, b)` joins two `Conn`s and bytes move from one
transport straight into the other inside `data_received`, with no coroutine per chunk;
`pause_writing` on one side pauses reading on the other (backpressure).

TLS runs over memory BIOs (`sidecar.tlsio.TlsSession`), not `loop.start_tls`, because asyncio's
SSL transport cannot half-close: it has no `write_eof` and tears the connection down on the
peer's close_notify. TLS 1.3 defines close_notify as closing one direction only
(RFC 8446 §6.1), so an app that shuts down its write side and then reads the response works
through the mesh: EOF becomes close_notify plus a TCP FIN, and close_notify becomes EOF.
A TCP FIN without close_notify is a truncation and fails the connection.

Failure policy: a peer's protocol error, reset or truncation resets the other side too (RST,
`SO_LINGER` 0), so the application sees the call fail instead of a silently short stream.
What this module does not do: decide routes, verify identities, log (callers do).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

from mesh.errors import CodecError
from sidecar.errors import ProxyError
from sidecar.tlsio import TlsSession, tls_failure

T = TypeVar("T")

BUFFER_LIMIT = 64 * 1024  # plaintext held before the splice; more pauses reading
WRITE_HIGH_WATER = 512 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)
READ_BUFFER = 256 * 1024  # as uvloop's own read buffer


_local = threading.local()


def _read_buffer() -> memoryview:
    """What every connection of this thread reads into (`get_buffer`). One is enough: each
    read is consumed before `buffer_updated` returns (copied into the TLS session, or into a
    `bytes` of its own), so connections never see each other's bytes."""
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(READ_BUFFER))
    return view


class Conn(asyncio.BufferedProtocol):
    """One TCP connection (see the module docstring). Create through `open_conn` or a server."""

    def __init__(self, label: str, on_made: Callable[[Conn], None] | None = None) -> None:
        self.label = label
        self._on_made = on_made
        self._transport: asyncio.Transport | None = None
        self.tls: TlsSession | None = None
        self._buf = bytearray()
        self._buffer_paused = False
        self.eof = False  # the byte stream from the peer ended cleanly
        self.eof_sent = False
        self.error: ProxyError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._peer: Conn | None = None
        self.relayed = 0  # payload bytes received and passed to the peer (no framing)
        # An observer of the bytes passed to the peer (the destination's HTTP telemetry, see
        # sidecar.http.tap); it never changes them. None: nothing but this check per chunk.
        self.tap: Callable[[bytes], None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._on_made is not None:
            self._on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        # Ciphertext goes straight from the read buffer into the TLS session (which copies it):
        # a `bytes` per read first was one more copy of every byte. Plain bytes are kept
        # (buffered, relayed, tapped), so they get their own `bytes`, as before.
        view = _read_buffer()[:nbytes]
        if self.tls is None:
            self._on_plain(bytes(view))
        else:
            self._tls_received(self.tls, view)

    def data_received(self, data: bytes) -> None:
        if self.tls is None:
            self._on_plain(data)
        else:
            self._tls_received(self.tls, data)

    def _tls_received(self, tls: TlsSession, data: bytes | memoryview) -> None:
        try:
            tls.feed(data)
            if not tls.handshake():
                self._flush_tls()
                return
            chunks = tls.read()
        except ssl.SSLError as e:
            self._flush_tls()  # let our alert reach the peer before we close
            self._fail(tls_failure(e))
            return
        self._flush_tls()
        self._wake()  # the handshake may have completed
        if chunks:
            # A read holding several records decrypts to a chunk each: passed on joined, they
            # cost the peer one send (one TLS record) instead of one per record.
            self._on_plain(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if tls.read_closed:
            self._on_eof()

    def eof_received(self) -> bool:
        if self.tls is None:
            self._on_eof()
        elif not self.tls.handshake_done:
            self._fail(ProxyError("peer closed", "during the TLS handshake"))
        elif not self.tls.read_closed:
            self._fail(ProxyError("truncated", "TCP FIN without TLS close_notify"))
        return True  # keep our write direction open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.error is None:
            self.error = ProxyError("connection lost", f"{self.label}: {exc}")
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()
        peer = self._peer
        if peer is not None and not (self.eof and peer.eof and self.eof_sent and peer.eof_sent):
            peer.reset()  # we lost a direction that was not finished: fail the other side

    def pause_writing(self) -> None:
        if self._peer is not None and self._peer._transport is not None:
            self._peer._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._peer is not None and self._peer._transport is not None:
            self._peer._transport.resume_reading()

    # -- the handler's interface ------------------------------------------------------------

    @property
    def transport(self) -> asyncio.Transport:
        assert self._transport is not None, "not connected"
        return self._transport

    def socket(self) -> Any:
        """The underlying socket object (asyncio's TransportSocket, uvloop's PseudoSocket)."""
        return self.transport.get_extra_info("socket")

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read again, unless unread bytes are over `BUFFER_LIMIT` before the splice: then
        reading resumes once they are taken (a handler resuming a connection whose buffer
        filled meanwhile must not lift the bound, or a fast sender fills memory)."""
        if self.transport.is_closing():
            return
        if self._peer is None and len(self._buf) > BUFFER_LIMIT:
            self._buffer_paused = True
            self.transport.pause_reading()
            return
        self._buffer_paused = False
        self.transport.resume_reading()

    async def read_frame(self, parse: Callable[[bytes], tuple[T, bytes] | None], what: str) -> T:
        """Wait until `parse` accepts the buffered bytes; what follows stays buffered."""
        while True:
            if self._buf:
                try:
                    result = parse(bytes(self._buf))
                except CodecError as e:
                    raise ProxyError(f"malformed {what}", str(e)) from e
                if result is not None:
                    value, rest = result
                    self._buf = bytearray(rest)
                    self._check_buffer()
                    return value
            if self.error is not None:
                raise self.error
            if self.eof or self.closed.done():
                raise ProxyError("peer closed", f"{self.label} closed before a complete {what}")
            await self._wait()

    async def start_tls(
        self, ctx: ssl.SSLContext, server_side: bool, session: ssl.SSLSession | None = None
    ) -> ssl.SSLObject:
        """Run a TLS handshake on this connection; bytes already buffered are fed to it."""
        tls = self.tls = TlsSession(ctx, server_side, session)
        pending, self._buf = bytes(self._buf), bytearray()
        self._check_buffer()
        self.data_received(pending)
        while not tls.handshake_done:
            if self.error is not None:
                raise self.error
            if self.closed.done():
                raise ProxyError("peer closed", f"{self.label} closed during the TLS handshake")
            await self._wait()
        if self.error is not None:  # e.g. an alert right after the handshake
            raise self.error
        return tls.obj

    def write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        if self.tls is None:
            self._transport.write(data)
            return
        try:
            out = self.tls.encrypt(data)
        except ssl.SSLError as e:
            self._fail(tls_failure(e))
            return
        if len(out) == 1:
            self._transport.write(out[0])
        else:
            self._transport.writelines(out)  # one writev with uvloop

    def writelines(self, chunks: list[bytes]) -> None:
        """`write` of `chunks` as one send: a response's head and the body that came with it
        reach the peer together (one system call, and over TLS one record while small)."""
        if len(chunks) <= 1:
            if chunks:
                self.write(chunks[0])
        elif self.tls is not None:
            self.write(b"".join(chunks))
        elif self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(chunks)  # one writev with uvloop, without a join

    def write_eof(self) -> None:
        """End our direction: close_notify (TLS) and a TCP FIN; the peer may keep sending."""
        if self.eof_sent:
            return
        self.eof_sent = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self.tls is not None:
            self.tls.close_write()
            self._flush_tls()
        if transport.can_write_eof():
            # The peer may have closed already (ENOTCONN): that ends this direction too, and
            # must not escape and leave the relay's other side open.
            with contextlib.suppress(OSError):
                transport.write_eof()
        self._maybe_finish()

    def detach(self) -> tuple[asyncio.Transport, TlsSession | None, bytes]:
        """Hand the socket, its TLS session and the unread plaintext to another protocol
        (`sidecar.smux`); this Conn is done with them."""
        transport, self._transport = self.transport, None
        tls, self.tls = self.tls, None
        pending, self._buf = bytes(self._buf), bytearray()
        if not self.closed.done():
            self.closed.set_result(None)
        return transport, tls, pending

    def finish(self) -> None:
        """End our direction and close once written (used after refusing a stream)."""
        self.write_eof()
        self.close()

    def close(self) -> None:
        """Close gracefully (pending writes are flushed first)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def reset_if_open(self) -> None:
        """Reset unless a close is already under way (for cleanup after cancellation)."""
        if self._transport is not None and not self._transport.is_closing():
            self.reset()

    def reset(self) -> None:
        """Abort with a TCP RST, so the peer sees a failure rather than a clean end."""
        transport = self._transport
        if transport is None or self.closed.done():
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()

    # -- internals --------------------------------------------------------------------------

    def _on_plain(self, data: bytes) -> None:
        if self._peer is not None:
            self.relayed += len(data)
            if self.tap is not None:
                self.tap(data)
            self._peer.write(data)
            return
        self._buf += data
        self._check_buffer()
        self._wake()

    def _on_eof(self) -> None:
        if self.eof:
            return
        self.eof = True
        if self._peer is not None:
            self._peer.write_eof()
            self._maybe_finish()
        self._wake()

    def _fail(self, error: ProxyError) -> None:
        if self.error is None:
            self.error = error
        self._wake()
        if self._peer is not None:  # spliced: nobody awaits us, so act here
            self._peer.reset()
            self.reset()
        elif self._transport is not None:
            self._transport.close()  # flushes a TLS alert, if any

    def _maybe_finish(self) -> None:
        """Both directions ended cleanly: close both transports."""
        peer = self._peer
        if peer is not None and self.eof and peer.eof and self.eof_sent and peer.eof_sent:
            self.close()
            peer.close()

    def _flush_tls(self) -> None:
        assert self.tls is not None
        out = self.tls.outgoing()
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(out)

    def _check_buffer(self) -> None:
        if self._transport is None or self._peer is not None:
            return
        over = len(self._buf) > BUFFER_LIMIT
        if over and not self._buffer_paused:
            self._buffer_paused = True
            self._transport.pause_reading()
        elif not over and self._buffer_paused:
            self._buffer_paused = False
            self.resume_reading()

    async def _wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter = fut
        try:
            await fut
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


async def open_conn(host: str, port: int, label: str, connect_timeout: float) -> Conn:
    """Connect over TCP; ProxyError("connect failed") with the address and the OS reason."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            _, conn = await loop.create_connection(lambda: Conn(label), host, port)
    except TimeoutError as e:
        raise ProxyError(
            "connect failed", f"{host}:{port}: timed out after {connect_timeout} s"
        ) from e
    except OSError as e:
        raise ProxyError("connect failed", f"{host}:{port}: {e.strerror or e}") from e
    return conn


def splice(a: Conn, b: Conn) -> None:
    """Join two connections: from now on bytes flow both ways until both directions end."""
    a._peer, b._peer = b, a
    for src, dst in ((a, b), (b, a)):
        pending, src._buf = bytes(src._buf), bytearray()
        if pending:
            src.relayed += len(pending)
            if src.tap is not None:
                src.tap(pending)
            dst.write(pending)
        if src.error is not None or (src.closed.done() and not src.eof):
            a.reset()
            b.reset()
            return
        if src.eof:
            dst.write_eof()
    for c in (a, b):
        if c._buffer_paused:
            c._buffer_paused = False
        c.resume_reading()
    a._maybe_finish()


async def relay(a: Conn, b: Conn) -> ProxyError | None:
    """Splice `a` and `b`, wait until both are closed, and return the first error, if any."""
    splice(a, b)
    await asyncio.gather(a.closed, b.closed)
    return a.error or b.error
