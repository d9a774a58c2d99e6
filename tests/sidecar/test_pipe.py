"""TlsSession back to back in memory (half-close semantics), and Conn's truncation check."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from ca.tls import client_context, server_context
from sidecar.errors import ProxyError
from sidecar.pipe import BUFFER_LIMIT, Conn, open_conn
from sidecar.tlsio import WRITE_BATCH, TlsSession
from tests.sidecar.conftest import EAST, Pki, spiffe, tls_in_memory


def pair(pki: Pki) -> tuple[TlsSession, TlsSession]:
    return tls_in_memory(
        client_context(pki.svid(pki.east, spiffe(EAST, "c")), pki.bundle),
        server_context(pki.svid(pki.east, spiffe(EAST, "s")), pki.bundle),
    )


def test_close_notify_ends_one_direction_only(pki: Pki) -> None:
    client, server = pair(pki)
    client.send(b"request")
    client.close_write()
    server.feed(client.outgoing())
    assert b"".join(server.read()) == b"request"
    assert server.read_closed
    # The server may still answer after the client's close_notify (RFC 8446 §6.1).
    server.send(b"x" * 100_000)
    server.close_write()
    client.feed(server.outgoing())
    assert len(b"".join(client.read())) == 100_000
    assert client.read_closed


def test_close_write_with_a_partial_record_pending_loses_nothing(pki: Pki) -> None:
    client, server = pair(pki)
    client.read()  # session tickets
    server.send(b"y" * 100_000)
    wire = server.outgoing()
    client.feed(wire[: len(wire) // 2 + 7])  # cut inside a record
    got = b"".join(client.read())
    client.close_write()
    client.feed(wire[len(wire) // 2 + 7 :])
    got += b"".join(client.read())
    assert got == b"y" * 100_000
    server.feed(client.outgoing())
    assert server.read() == []
    assert server.read_closed


def test_a_large_write_is_encrypted_in_batches_that_decrypt_in_order(pki: Pki) -> None:
    client, server = pair(pki)
    pending = server.outgoing()  # session tickets, not yet sent: they must come first
    server.send(b"hello")
    data = bytes(range(256)) * 1200  # 300 KiB: five batches
    pieces = server.encrypt(data)
    assert len(pieces) == -(-len(data) // WRITE_BATCH)
    client.feed(pending + b"".join(pieces))
    assert b"".join(client.read()) == b"hello" + data
    assert server.encrypt(b"small") != []
    assert server.outgoing() == b""  # nothing left behind in the BIO


async def test_fin_without_close_notify_is_a_truncation(pki: Pki) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"partial")
        await writer.drain()
        writer.get_extra_info("socket").shutdown(socket.SHUT_WR)  # FIN under the TLS layer
        with contextlib.suppress(Exception):
            await reader.read()
        writer.transport.abort()

    ctx = server_context(pki.svid(pki.east, spiffe(EAST, "s")), pki.bundle)
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    conn = await open_conn("127.0.0.1", port, "test", 5)
    try:
        await conn.start_tls(
            client_context(pki.svid(pki.east, spiffe(EAST, "c")), pki.bundle), False
        )
        with pytest.raises(ProxyError) as info:
            async with asyncio.timeout(5):
                await conn.read_frame(lambda b: None, "anything")
        assert info.value.reason == "truncated"
    finally:
        conn.reset_if_open()
        server.close()
        await server.wait_closed()


async def test_resuming_a_connection_keeps_its_unread_buffer_bounded() -> None:
    """A handler resumes reading (e.g. to sniff) after bytes piled up: the bound holds."""
    loop = asyncio.get_running_loop()
    sent = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x" * 4_000_000)  # far more than BUFFER_LIMIT
        sent.set()
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    sender = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = sender.sockets[0].getsockname()[1]
    try:
        _, conn = await loop.create_connection(lambda: Conn("test"), "127.0.0.1", port)
        await sent.wait()

        def over_limit(b: bytes) -> tuple[None, bytes] | None:  # takes nothing
            return (None, b) if len(b) > BUFFER_LIMIT else None

        async with asyncio.timeout(5):
            await conn.read_frame(over_limit, "a full buffer")
        assert not conn.transport.is_reading()  # reading paused itself over the limit
        conn.resume_reading()  # what a sniffing handler does
        assert not conn.transport.is_reading()
        first = await conn.read_frame(lambda b: (b[:10], b[10:]), "ten bytes")
        assert first == b"x" * 10
        assert not conn.transport.is_reading()  # still over the limit
        await conn.read_frame(lambda b: (b, b""), "the rest")
        assert conn.transport.is_reading()  # drained: reading again
        conn.reset()
    finally:
        sender.close()
        await sender.wait_closed()


async def test_connect_failure_names_the_address() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(ProxyError, match=f"127.0.0.1:{port}") as info:
            await open_conn("127.0.0.1", port, "test", 5)
    assert info.value.reason == "connect failed"
