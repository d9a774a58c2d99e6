"""An HTTP/2 server that sends GOAWAY every `LIMIT` requests per connection, and a load client.

Self-contained (h2 and hyperframe only) so that it runs as a rig pod's workload and client
(`python tests/h2_goaway_peer.py serve|load ...`) as well as inside the loopback tests
(`tests/sidecar/test_h2_goaway.py`, `tests/e2e/test_retries.py`).

The server, on each connection, answers `LIMIT` requests, then sends GOAWAY naming the last of
them as the last stream it processed, answers the streams up to it, ignores the ones above it
and closes with a lingering close, as servers with a per-connection request limit (nginx's
`keepalive_requests`, Envoy's `max_requests_per_connection`) do. The client keeps `streams`
requests in flight on one connection and counts what came back.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
from dataclasses import dataclass, field
from typing import cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hyperframe.frame

LIMIT = 100  # requests per server connection before GOAWAY


@dataclass
class ServerStats:
    connections: int = 0
    goaways: int = 0
    answered: int = 0
    ignored: int = 0  # streams that arrived above a GOAWAY's last-stream-id
    transports: list[asyncio.Transport] = field(default_factory=list)


class LimitedProtocol(asyncio.Protocol):
    def __init__(self, server: ServerStats) -> None:
        self._server = server
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self._transport: asyncio.Transport | None = None
        self._requests = 0
        self._last: int | None = None  # the GOAWAY's last-stream-id, once sent
        self._open: set[int] = set()  # streams we owe an answer
        self._closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._server.transports.append(self._transport)
        self._server.connections += 1
        self._conn.initiate_connection()
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._close()
            return
        for e in events:
            if isinstance(e, h2.events.RequestReceived) and e.stream_id:
                if self._last is not None and e.stream_id > self._last:
                    self._server.ignored += 1  # above the GOAWAY: never processed
                    continue
                self._requests += 1
                self._open.add(e.stream_id)
                if self._requests == LIMIT:
                    self._goaway(e.stream_id)
            elif isinstance(e, h2.events.StreamEnded) and e.stream_id in self._open:
                self._answer(e.stream_id)
        self._flush()
        if self._last is not None and not self._open:
            self._close()

    def _goaway(self, last: int) -> None:
        """GOAWAY now, naming `last`, while the streams up to it are still answered (h2's own
        `close_connection` would forbid those answers, so the frame is written here)."""
        self._flush()
        frame = hyperframe.frame.GoAwayFrame(0, last_stream_id=last, error_code=0)
        assert self._transport is not None
        self._transport.write(frame.serialize())
        self._last = last
        self._server.goaways += 1

    def _answer(self, sid: int) -> None:
        self._open.discard(sid)
        self._server.answered += 1
        body = b"ok\n"
        self._conn.send_headers(sid, [(":status", "200"), ("content-length", str(len(body)))])
        self._conn.send_data(sid, body, end_stream=True)

    def _flush(self) -> None:
        out = self._conn.data_to_send()
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(out)

    def _close(self) -> None:
        """A lingering close, as nginx and Envoy do: FIN after the last answer, then read and
        drop what still comes until the peer closes. Closing the socket with unread bytes
        would send a RST that destroys the last answers still in the send buffer."""
        self._flush()
        if self._transport is not None and not self._closing:
            self._closing = True
            self._transport.write_eof()


async def h2_client(
    host: str, port: int, n: int, streams: int, authority: str
) -> collections.Counter[str]:
    """`n` GET requests on one HTTP/2 connection, `streams` in flight at a time; what came back
    (a status, `reset` or `lost`) counted."""
    reader, writer = await asyncio.open_connection(host, port)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    out: collections.Counter[str] = collections.Counter()
    status: dict[int, str] = {}
    sent = done = 0

    def start() -> None:
        nonlocal sent
        sid = conn.get_next_available_stream_id()
        head = [(":method", "GET"), (":scheme", "http"), (":authority", authority)]
        conn.send_headers(sid, [*head, (":path", f"/?i={sent}")], end_stream=True)
        status[sid] = "lost"
        sent += 1

    def finish(sid: int, what: str) -> None:
        nonlocal done
        status.pop(sid, None)
        out[what] += 1
        done += 1
        if sent < n:
            start()

    try:
        while sent < min(n, streams):
            start()
        writer.write(conn.data_to_send())
        while done < n:
            data = await reader.read(65536)
            if not data:
                break
            for e in conn.receive_data(data):
                if isinstance(e, h2.events.ResponseReceived) and e.stream_id:
                    status[e.stream_id] = dict(e.headers or []).get(":status", "?")
                elif isinstance(e, h2.events.DataReceived) and e.stream_id:
                    conn.acknowledge_received_data(e.flow_controlled_length or 0, e.stream_id)
                elif isinstance(e, h2.events.StreamEnded) and e.stream_id in status:
                    finish(e.stream_id, status[e.stream_id])
                elif isinstance(e, h2.events.StreamReset) and e.stream_id in status:
                    finish(e.stream_id, "reset")
            writer.write(conn.data_to_send())
    finally:
        out["lost"] += n - done
        writer.close()
    return out


async def serve(host: str, port: int) -> None:
    """Serve until killed."""
    stats = ServerStats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: LimitedProtocol(stats), host, port)
    async with server:
        await server.serve_forever()


async def load(host: str, port: int, requests: int, conns: int, streams: int) -> None:
    per_conn = requests // conns
    results = await asyncio.gather(
        *(h2_client(host, port, per_conn, streams, f"{host}:{port}") for _ in range(conns))
    )
    print(json.dumps(dict(sum(results, collections.Counter[str]()))))


def main(argv: list[str]) -> None:
    match argv:
        case ["serve", host, port]:
            asyncio.run(serve(host, int(port)))
        case ["load", host, port, requests, conns, streams]:
            asyncio.run(load(host, int(port), int(requests), int(conns), int(streams)))
        case _:
            raise SystemExit("usage: h2_goaway_peer.py serve HOST PORT | load HOST PORT N C S")


if __name__ == "__main__":
    main(sys.argv[1:])
