"""The multiplexing driver (`sidecar.smux`) over real loopback mTLS connections.

Each side's streams are `Conn`s, driven here as the outbound and inbound drive them: bounded
reads (`read_frame`), writes, half-close, reset, and `relay` to a real TCP app.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from structlog.testing import capture_logs

from ca.tls import client_context, peer_identity, server_context
from sidecar.errors import ProxyError
from sidecar.pipe import BUFFER_LIMIT, Conn, open_conn, relay
from sidecar.smux import ALPN, WINDOW, SmuxConnection
from tests.helpers import until
from tests.sidecar.conftest import EAST, Pki, spiffe

Handler = Callable[[Conn], Awaitable[None]]


def take(n: int) -> Callable[[bytes], tuple[bytes, bytes] | None]:
    return lambda buf: (buf[:n], buf[n:]) if len(buf) >= n else None


def take_all(buf: bytes) -> tuple[bytes, bytes] | None:
    return (buf, b"") if buf else None


async def read_to_eof(conn: Conn) -> bytes:
    out = bytearray()
    while True:
        try:
            out += await conn.read_frame(take_all, "bytes")
        except ProxyError as e:
            if e.reason != "peer closed":
                raise
            return bytes(out)


@dataclass
class Pair:
    """A listening smux server and a way to dial clients to it."""

    pki: Pki
    handler: Handler
    servers: list[SmuxConnection] = field(default_factory=list)
    clients: list[SmuxConnection] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    server: asyncio.Server | None = None

    async def start(self) -> None:
        svid = self.pki.svid(self.pki.east, spiffe(EAST, "payments"))
        self.server_ctx = server_context(svid, self.pki.bundle, alpn=(ALPN,))
        client_svid = self.pki.svid(self.pki.east, spiffe(EAST, "client"))
        self.client_ctx = client_context(client_svid, self.pki.bundle, alpn=(ALPN,))
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Conn("caller", self._accepted), "127.0.0.1", 0
        )

    def _accepted(self, conn: Conn) -> None:
        self._spawn(self._serve(conn))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, conn: Conn) -> None:
        ssl_obj = await conn.start_tls(self.server_ctx, server_side=True)
        assert ssl_obj.selected_alpn_protocol() == ALPN
        smux = SmuxConnection(
            is_client=False,
            peer=peer_identity(ssl_obj, self.pki.bundle),
            on_stream=lambda stream: self._spawn(self.handler(stream)),
        )
        smux.adopt(conn)
        self.servers.append(smux)

    async def dial(self) -> SmuxConnection:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        conn = await open_conn(host, port, "sidecar", 5.0)
        ssl_obj = await conn.start_tls(self.client_ctx, server_side=False)
        client = SmuxConnection(is_client=True, peer=peer_identity(ssl_obj, self.pki.bundle))
        client.adopt(conn)
        self.clients.append(client)
        return client

    async def aclose(self) -> None:
        for s in self.servers + self.clients:
            s.close("test over")
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@contextlib.asynccontextmanager
async def pair(pki: Pki, handler: Handler) -> AsyncIterator[Pair]:
    p = Pair(pki, handler)
    await p.start()
    try:
        async with asyncio.timeout(30):  # a bug must fail the test, not hang it
            yield p
    finally:
        await p.aclose()


async def echo_reversed(stream: Conn) -> None:
    """Read to the caller's EOF, answer the bytes reversed, then end our direction."""
    data = await read_to_eof(stream)
    stream.write(data[::-1])
    stream.write_eof()


async def test_a_stream_carries_bytes_both_ways_with_half_close(pki: Pki) -> None:
    async with pair(pki, echo_reversed) as p:
        client = await p.dial()
        stream = client.open_stream("app")
        payload = os.urandom(3 * WINDOW)  # more than one window: credit must come back
        stream.write(payload)
        stream.write_eof()  # our direction ends; the answer still arrives
        assert await read_to_eof(stream) == payload[::-1]
        assert stream.error is None
        # FIN both ways: the stream is finished on both ends, the connection stays.
        await until(lambda: client.open_streams == 0, what="client stream finished")
        await until(lambda: p.servers[0].open_streams == 0, what="server stream finished")
        assert not client.closed.done()


async def test_a_reset_stream_fails_the_other_end_only(pki: Pki) -> None:
    seen: list[ProxyError | None] = []

    async def hold(stream: Conn) -> None:
        await stream.read_frame(take(5), "hello")
        try:
            await read_to_eof(stream)
        except ProxyError as e:
            seen.append(e)
            return
        seen.append(None)
        stream.finish()

    async with pair(pki, hold) as p:
        client = await p.dial()
        doomed, other = client.open_stream("app"), client.open_stream("app")
        doomed.write(b"hello")
        other.write(b"hello")
        await until(
            lambda: bool(p.servers) and p.servers[0].open_streams == 2, what="both streams open"
        )
        doomed.reset()
        await until(lambda: len(seen) == 1, what="the server end saw the reset")
        assert seen[0] is not None
        assert "stream reset by peer" in seen[0].detail
        assert p.servers[0].open_streams == 1
        other.write_eof()  # the other stream is untouched: it still finishes cleanly
        await until(lambda: len(seen) == 2, what="the other stream ended")
        assert seen[1] is None


async def test_a_reader_that_stops_holds_its_stream_only(pki: Pki) -> None:
    """Flow control: a destination that reads nothing stops its sender at about the window;
    a second stream over the same connection flows meanwhile."""
    stalled: list[Conn] = []
    release = asyncio.Event()

    async def handler(stream: Conn) -> None:
        first = await stream.read_frame(take(1), "tag")
        if first == b"S":
            stalled.append(stream)
            await release.wait()  # reads nothing meanwhile
            rest = await read_to_eof(stream)
            stream.write(str(len(rest)).encode())
            stream.write_eof()
        else:
            await echo_reversed(stream)

    async with pair(pki, handler) as p:
        client = await p.dial()
        slow = client.open_stream("app")
        size = 8 * WINDOW
        slow.write(b"S" + bytes(size))
        slow.write_eof()
        await until(lambda: len(stalled) == 1, what="the stalled stream arrived")
        server_stream = stalled[0]
        # The sender keeps what the receiver did not grant; the receiver holds at most
        # a window beyond its Conn's own bounded buffer.
        await until(
            lambda: slow.transport.get_write_buffer_size() >= size - WINDOW - BUFFER_LIMIT,
            what="the sender holds the rest",
        )
        assert len(server_stream._buf) <= BUFFER_LIMIT + 256 * 1024
        # Another stream on the same connection is not blocked behind it.
        quick = client.open_stream("app")
        quick.write(b"Qabc")
        quick.write_eof()
        assert await read_to_eof(quick) == b"cba"
        release.set()
        assert await read_to_eof(slow) == str(size).encode()


async def test_many_concurrent_streams_share_one_connection(pki: Pki) -> None:
    async with pair(pki, echo_reversed) as p:
        client = await p.dial()

        async def one(i: int) -> bytes:
            stream = client.open_stream("app")
            data = os.urandom(10_000 + i)
            stream.write(data)
            stream.write_eof()
            return (await read_to_eof(stream))[::-1] == data

        results = await asyncio.gather(*(one(i) for i in range(200)))
        assert all(results)
        assert client.opened == 200
        assert len(p.servers) == 1  # one TCP connection, one handshake


async def test_streams_relay_to_a_real_app_through_relay(pki: Pki) -> None:
    """The inbound's shape: a stream spliced to a TCP connection with `relay`, unchanged."""

    async def app_serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # to the EOF relayed from the stream's FIN
        writer.write(data.upper())
        writer.write_eof()
        await writer.drain()
        writer.close()

    app_server = await asyncio.start_server(app_serve, "127.0.0.1", 0)
    app_port = app_server.sockets[0].getsockname()[1]
    results: list[ProxyError | None] = []

    async def to_app(stream: Conn) -> None:
        app = await open_conn("127.0.0.1", app_port, "app", 5.0)
        results.append(await relay(stream, app))

    try:
        async with pair(pki, to_app) as p:
            client = await p.dial()
            stream = client.open_stream("app")
            stream.write(b"x" * 300_000)
            stream.write_eof()
            assert await read_to_eof(stream) == b"X" * 300_000
            await until(lambda: results == [None], what="the relay ended cleanly")
    finally:
        app_server.close()
        await app_server.wait_closed()


async def test_garbage_frames_close_that_connection_only(pki: Pki) -> None:
    async with pair(pki, echo_reversed) as p:
        good, bad = await p.dial(), await p.dial()
        with capture_logs() as logs:
            assert bad.tls is not None
            bad.tls.send(b"\x09" + bytes(9))  # frame type 9 does not exist
            bad._transport.write(bad.tls.outgoing())  # type: ignore[union-attr]
            await until(lambda: bad.closed.done(), what="the peer closed the bad connection")
        failed = [e for e in logs if e["event"] == "smux connection failed"]
        assert failed
        assert failed[0]["reason"] == "protocol error: unknown frame type 9"
        assert "peer going away: protocol error" in bad.close_reason
        stream = good.open_stream("app")
        stream.write(b"still here")
        stream.write_eof()
        assert await read_to_eof(stream) == b"ereh llits"


async def test_a_closed_connection_resets_its_streams(pki: Pki) -> None:
    async def hold(stream: Conn) -> None:
        await stream.closed

    async with pair(pki, hold) as p:
        client = await p.dial()
        streams = [client.open_stream("app") for _ in range(3)]
        for s in streams:
            s.write(b"hi")
        await until(lambda: bool(p.servers) and p.servers[0].open_streams == 3, what="streams open")
        p.servers[0].close("revoked")
        for s in streams:
            await s.closed
            assert s.error is not None
            assert "revoked" in s.error.detail
        await until(lambda: client.closed.done(), what="client connection closed")
        with pytest.raises(Exception, match="no new streams"):
            client.open_stream("app")


async def test_a_stream_over_its_mark_before_the_splice_still_stops_its_source(pki: Pki) -> None:
    """A stream whose backlog passed the high-water mark while it had no peer (the handler
    phase) pauses its peer as soon as it has one: the source app is not read without bound."""
    stuck = asyncio.Event()

    async def never_read(stream: Conn) -> None:
        await stuck.wait()

    flood_writers: list[asyncio.StreamWriter] = []

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        flood_writers.append(writer)
        chunk = bytes(256 * 1024)
        with contextlib.suppress(ConnectionError):
            for _ in range(160):  # 40 MiB, unless the reader stops us first
                writer.write(chunk)
                await writer.drain()

    source = await asyncio.start_server(flood, "127.0.0.1", 0)
    try:
        async with pair(pki, never_read) as p:
            client = await p.dial()
            stream = client.open_stream("app")
            stream.write(bytes(3 * WINDOW))  # over the mark, nobody to pause yet
            host, port = source.sockets[0].getsockname()[:2]
            app = await open_conn(host, port, "app", 5.0)
            relaying = asyncio.ensure_future(relay(app, stream))
            # The flood's sender gets stuck once we stop reading it.
            await until(
                lambda: (
                    bool(flood_writers)
                    and flood_writers[0].transport.get_write_buffer_size() > 0
                    and not app.transport.is_reading()
                ),
                what="the source app is no longer read",
            )
            # What was written before, plus at most a read or two of the app.
            assert stream.transport.get_write_buffer_size() < 4 * WINDOW
            stream.reset()
            app.reset()
            await relaying
            stuck.set()
    finally:
        source.close()
        await source.wait_closed()
