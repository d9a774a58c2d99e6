"""What arrives together leaves together: a send (and a TLS record) per burst, not per part.

Every send is a system call, and on the inner connection a TLS record; on the HTTP path a small
request or response used to leave in parts (head, body; or a record at a time). Observed from
outside, with the kernel's count of data segments a TCP socket received (`tcpi_data_segs_in`,
Linux >= 4.6): on loopback with TCP_NODELAY, each small send arrives as one segment. Also
here, with the same one-send app: `Expect: 100-continue`, answered by the source sidecar and
dropped from the forwarded request (which is copied only when it has the header).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
from typing import Any

from ca.tls import client_context, server_context
from mesh.model import ClusterWeight, TrafficPolicy
from sidecar.pipe import Conn, open_conn, relay
from tests.helpers import until
from tests.sidecar.conftest import EAST, Pki, spiffe
from tests.sidecar.http_rig import SVC, HttpRig, start_http_rig, stop_http_rig

_DATA_SEGS_IN = 152  # offset of tcpi_data_segs_in in struct tcp_info (linux/tcp.h)


def data_segments_in(sock: Any) -> int:
    """Data-carrying TCP segments `sock` has received (pure ACKs not counted)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, _DATA_SEGS_IN)[0])


def unread(sock: Any) -> int:
    """Bytes waiting in `sock`'s receive queue."""
    got = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", got)[0])


async def test_tls_records_read_at_once_reach_the_peer_as_one_send(pki: Pki) -> None:
    """The destination sidecar's relay: two records that came in one read are passed on as
    one send to the app, not one per record."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    app_sockets: list[Any] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        app_sockets.append(writer.get_extra_info("socket"))
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                received.extend(data)
        writer.close()

    accepted: list[Conn] = []
    app_server = await asyncio.start_server(app, "127.0.0.1", 0)
    caller_server = await loop.create_server(
        lambda: Conn("caller", on_made=accepted.append), "127.0.0.1", 0
    )
    client = await open_conn("127.0.0.1", caller_server.sockets[0].getsockname()[1], "client", 5)
    relaying: asyncio.Future[Any] | None = None
    try:
        await until(lambda: accepted, what="the caller's connection")
        caller = accepted[0]
        await asyncio.gather(
            client.start_tls(
                client_context(pki.svid(pki.east, spiffe(EAST, "c")), pki.bundle), False
            ),
            caller.start_tls(
                server_context(pki.svid(pki.east, spiffe(EAST, "s")), pki.bundle), True
            ),
        )
        app_conn = await open_conn("127.0.0.1", app_server.sockets[0].getsockname()[1], "app", 5)
        caller.pause_reading()  # both records wait in the kernel: the next read takes both
        client.write(b"a" * 100)
        client.write(b"b" * 200)
        records = 2 * (5 + 1 + 16)  # TLS 1.3: a record's header, inner type and AEAD tag
        await until(lambda: unread(caller.socket()) >= 300 + records, what="both records")
        relaying = asyncio.ensure_future(relay(caller, app_conn))  # reads again
        await until(lambda: len(received) >= 300, what="the bytes at the app")
        assert bytes(received) == b"a" * 100 + b"b" * 200
        assert data_segments_in(app_sockets[0]) == 1
        client.write_eof()
        await until(lambda: relaying.done(), what="the relay's end")
        assert relaying.result() is None
    finally:
        client.reset_if_open()
        for conn in accepted:
            conn.reset_if_open()
        if relaying is not None:
            with contextlib.suppress(Exception):
                await relaying
        for server in (caller_server, app_server):
            server.close()
            await server.wait_closed()


async def _one_send_app(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    segments: list[int],
    heads: list[bytes] | None = None,
) -> None:
    """An app answering each request (Content-Length body) in one send; it records how many
    data segments each request came in (and its head)."""
    sock = writer.get_extra_info("socket")
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if heads is not None:
                heads.append(head)
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            segments.append(data_segments_in(sock) - sum(segments))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world")
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def _exchange(rig: HttpRig, body: bytes) -> tuple[bytes, int]:
    """Send a request's head and body as two sends; the response and the data segments it
    arrived in (blocking: run in a thread)."""
    conn = rig.connection()
    sock = conn.sock
    assert sock is not None
    try:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: api\r\nContent-Length: %d\r\n\r\n" % len(body))
        sock.sendall(body)
        response = b""
        while not response.endswith(b"hello world"):
            chunk = sock.recv(65536)
            assert chunk, response
            response += chunk
        return response, data_segments_in(sock)
    finally:
        conn.close()


async def test_a_small_request_and_its_response_each_travel_as_one_send(pki: Pki) -> None:
    rig = await start_http_rig(pki, [("east", "a", {})])
    pod = rig.pods[0]
    await asyncio.to_thread(pod.stop_app)
    segments: list[int] = []
    app = await asyncio.start_server(
        lambda r, w: _one_send_app(r, w, segments), pod.app_ip, rig.app_port
    )
    try:
        rig.source.outbound.http.sniff_timeout = 0
        rig.apply(TrafficPolicy(SVC, (ClusterWeight("local", 100),)))
        for _ in range(2):  # a new inner connection, then a pooled one
            response, response_segments = await asyncio.to_thread(_exchange, rig, b"z" * 1024)
            assert response.startswith(b"HTTP/1.1 200 OK\r\n")
            # The source sidecar read the response's head and body together: the app gets
            # them in one send, not the head, then the body.
            assert response_segments == 1
        # The head and the body came in two sends; the source sidecar read the body ahead
        # and sent both as one TLS record, which the destination passed on as one send.
        assert segments == [1, 1]
        assert rig.source.outbound.http.pool.opened == 1
    finally:
        app.close()
        await app.wait_closed()
        await stop_http_rig(rig)


def _expect_continue(rig: HttpRig) -> tuple[bytes, bytes]:
    """A request with `Expect: 100-continue` whose body waits for the 100: the interim
    response and the final one (blocking: run in a thread)."""
    conn = rig.connection()
    sock = conn.sock
    assert sock is not None
    try:
        sock.sendall(
            b"POST /x HTTP/1.1\r\nHost: api\r\nX-Kept: 1\r\nExpect: 100-continue\r\n"
            b"Content-Length: 3\r\n\r\n"
        )
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            chunk = sock.recv(1)
            assert chunk, interim
            interim += chunk
        sock.sendall(b"abc")
        response = b""
        while not response.endswith(b"hello world"):
            chunk = sock.recv(65536)
            assert chunk, response
            response += chunk
        return interim, response
    finally:
        conn.close()


async def test_expect_100_continue_is_answered_by_the_sidecar_and_not_forwarded(pki: Pki) -> None:
    rig = await start_http_rig(pki, [("east", "a", {})])
    pod = rig.pods[0]
    await asyncio.to_thread(pod.stop_app)
    heads: list[bytes] = []
    app = await asyncio.start_server(
        lambda r, w: _one_send_app(r, w, [], heads), pod.app_ip, rig.app_port
    )
    try:
        rig.source.outbound.http.sniff_timeout = 0
        rig.apply(TrafficPolicy(SVC, (ClusterWeight("local", 100),)))
        interim, response = await asyncio.to_thread(_expect_continue, rig)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        await asyncio.to_thread(_exchange, rig, b"z")  # no Expect: the headers as they were
        fields = [[line.split(b":")[0].lower() for line in h.split(b"\r\n")[1:]] for h in heads]
        assert b"expect" not in fields[0]
        assert b"x-kept" in fields[0]
        assert fields[1][:1] == [b"host"]
    finally:
        app.close()
        await app.wait_closed()
        await stop_http_rig(rig)
