"""Reading HTTP/1.1 events off a `FlowConn`, and a request body kept for replay.

A request body is read ahead up to `REPLAY_LIMIT` bytes before the first try: if it ends
within the limit the request is replayable (retries and mirroring may send it again, with a
`Content-Length`); otherwise the prefix is sent and the rest streams from the app as it
arrives, with its original framing, and the request is tried once.
"""

from __future__ import annotations

from sidecar.http.codec import (
    Data,
    EndOfMessage,
    Event,
    Framing,
    NeedData,
    Reader,
)
from sidecar.http.encode import LAST_CHUNK, encode_chunk
from sidecar.http.flow import FlowConn

REPLAY_LIMIT = 256 * 1024


async def next_event(conn: FlowConn, reader: Reader) -> Event:
    """The next event of `reader`, reading from `conn` as needed (ProxyError, or
    HttpProtocolError from the parser, on failure)."""
    while True:
        event = reader.next_event()
        if not isinstance(event, NeedData):
            return event
        await read_more(conn, reader)


async def read_more(conn: FlowConn, reader: Reader) -> None:
    """Feed `reader` what arrives next on `conn` (waiting for it), or its end."""
    data = await conn.read_some()
    if data:
        reader.feed(data)
    else:
        reader.feed_eof()


class RequestBody:
    def __init__(self, app: FlowConn, reader: Reader) -> None:
        self.app = app
        self.reader = reader
        self.framing: Framing = reader.framing
        self.chunks: list[bytes] = []
        self.size = 0
        if reader.state == "body" and reader.framing.kind == "none":
            event = reader.next_event()  # no body: the message ends with its head
            assert isinstance(event, EndOfMessage), event
        self.complete = reader.state == "done"
        self.streamed = False  # the rest was read from the app into a try: no replay
        self.streamed_size = 0  # bytes of it (for the request-bytes metric)

    async def prefetch(self, limit: int = REPLAY_LIMIT) -> None:
        while not self.complete and self.size < limit:
            event = await next_event(self.app, self.reader)
            match event:
                case Data(data=data):
                    self.chunks.append(data)
                    self.size += len(data)
                case EndOfMessage():
                    self.complete = True
                case _:
                    raise AssertionError(f"unexpected {event!r} in a request body")

    @property
    def sent(self) -> int:
        """Body bytes read from the app so far (read ahead, then streamed)."""
        return self.size + self.streamed_size

    @property
    def out_framing(self) -> Framing:
        """Framing to send with: a complete body by length, else the app's own."""
        return Framing("length", self.size) if self.complete else self.framing

    async def send(self, conn: FlowConn, head: bytes) -> None:
        """Write `head` and the body to `conn` (streaming the rest from the app if needed)."""
        chunked = self.out_framing.kind == "chunked"
        out = [head]
        out += [encode_chunk(c) for c in self.chunks] if chunked else self.chunks
        conn.write(b"".join(out))
        if self.complete:
            await conn.drain()
            return
        self.streamed = True
        while True:
            await conn.drain()
            event = await next_event(self.app, self.reader)
            match event:
                case Data(data=data):
                    self.streamed_size += len(data)
                    conn.write(encode_chunk(data) if chunked else data)
                case EndOfMessage():
                    if chunked:
                        conn.write(LAST_CHUNK)
                    self.complete = True
                    return
                case _:
                    raise AssertionError(f"unexpected {event!r} in a request body")

    async def discard(self, limit: int) -> bool:
        """Read and drop the rest of the body (after a local answer); False if over `limit`."""
        dropped = 0
        while not self.complete:
            if dropped > limit:
                return False
            event = await next_event(self.app, self.reader)
            if isinstance(event, Data):
                dropped += len(event.data)
            else:
                self.complete = True
        return True
