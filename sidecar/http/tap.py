"""Watching an inbound connection's HTTP/1.1 exchanges without touching a byte.

The destination sidecar relays bytes (`sidecar.pipe`); for telemetry it still needs each
request's start (method, target, `traceparent`) and end (status, bytes). `HttpTap` is fed a
copy of what flows each way (`Conn.tap`) and parses it with the same `Reader` as the source
side: the caller's first bytes decide HTTP/1.x or not (`sniff_http1`, as the source's
sniffing), then requests are matched to responses in order (HTTP/1.1 has no pipelining
reordering, RFC 9112 §9.3.2). A parse error, a 101 upgrade or bytes the app sends before any
request end the watching (`mode` "opaque"): the relay goes on untouched either way.

Pure: no I/O and no clock; `started` and `finished` are the caller's callbacks. What it does
not do: rewrite anything (the app sees the source's `traceparent`), or HTTP/2.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from sidecar.http.codec import (
    NEED_DATA,
    ConnectionClosed,
    Data,
    EndOfMessage,
    HttpProtocolError,
    Reader,
    Request,
    Response,
)
from sidecar.sniff import sniff_http1

SNIFF_BYTES = 16  # more than the longest method sniff_http1 looks for


class Exchange:
    """One request seen by the tap, and its response as far as seen."""

    __slots__ = ("method", "request_bytes", "response_bytes", "status", "target", "token")

    def __init__(self, request: Request) -> None:
        self.method = request.method
        self.target = request.target
        self.status = 0
        self.request_bytes = 0
        self.response_bytes = 0
        self.token: Any = None  # whatever `started` returned (the span, the start time)


class HttpTap:
    """`started(request, exchange)` when a request head passed, returning a token;
    `finished(exchange, error)` once its response ended ("" ) or never will (a reason).
    `on_mode(mode)` when the connection turns out "http" or "opaque"."""

    def __init__(
        self,
        started: Callable[[Request, Exchange], Any],
        finished: Callable[[Exchange, str], None],
        on_mode: Callable[[str], None],
    ) -> None:
        self._started = started
        self._finished = finished
        self._on_mode = on_mode
        self.mode = "sniff"  # sniff | http | opaque
        self._held = b""
        self._requests = Reader("request")
        self._responses = Reader("response")
        self._pending: deque[Exchange] = deque()
        self.exchanges = 0

    # -- bytes in ---------------------------------------------------------------------------

    def from_caller(self, data: bytes) -> None:
        if self.mode == "sniff":
            self._held += data  # a few bytes at most: the verdict comes within SNIFF_BYTES
            verdict = sniff_http1(self._held[:SNIFF_BYTES])
            if verdict is None:
                return
            data, self._held = self._held, b""
            if not verdict:
                self._set_mode("opaque")
                return
            self._set_mode("http")
        if self.mode != "http":
            return
        self._requests.feed(data)
        try:
            self._drain_requests()
        except HttpProtocolError as e:
            self._give_up(f"unparsed request: {e.detail}")

    def from_app(self, data: bytes) -> None:
        if self.mode == "sniff":
            self._set_mode("opaque")  # the server spoke first: not HTTP
            return
        if self.mode != "http":
            return
        if not self._pending:
            self._give_up("response without a request")
            return
        self._responses.feed(data)
        try:
            self._drain_responses()
        except HttpProtocolError as e:
            self._give_up(f"unparsed response: {e.detail}")

    def close(self, error: str) -> None:
        """The connection ended: a response read until close ends here; others never will."""
        if self.mode == "http" and self._pending:
            self._responses.feed_eof()
            try:
                self._drain_responses()
            except HttpProtocolError as e:
                error = error or f"unparsed response: {e.detail}"
        while self._pending:
            self._finished(self._pending.popleft(), error or "connection closed")
        self.mode = "opaque"

    # -- parsing ----------------------------------------------------------------------------

    def _drain_requests(self) -> None:
        reader = self._requests
        while self.mode == "http":
            event = reader.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, Request):
                exchange = Exchange(event)
                self._pending.append(exchange)
                self.exchanges += 1
                exchange.token = self._started(event, exchange)
            elif isinstance(event, Data):
                if self._pending:
                    self._pending[-1].request_bytes += len(event.data)
            elif isinstance(event, EndOfMessage):
                reader.next_message()
            elif isinstance(event, ConnectionClosed):
                return
            else:  # pragma: no cover - Reader("request") yields nothing else
                raise AssertionError(f"unexpected {event!r}")

    def _drain_responses(self) -> None:
        reader = self._responses
        while self.mode == "http" and self._pending:
            current = self._pending[0]
            if reader.state == "head":
                reader.expect(current.method)
            event = reader.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, Response):
                if event.status == 101:
                    current.status = 101
                    self._finished(self._pending.popleft(), "")
                    self._give_up("")  # upgraded: the bytes are another protocol now
                    return
                if event.status >= 200:
                    current.status = event.status
            elif isinstance(event, Data):
                current.response_bytes += len(event.data)
            elif isinstance(event, EndOfMessage):
                reader.next_message()
                self._finished(self._pending.popleft(), "")
            elif isinstance(event, ConnectionClosed):
                return
            else:  # pragma: no cover
                raise AssertionError(f"unexpected {event!r}")

    def _set_mode(self, mode: str) -> None:
        self.mode = mode
        self._on_mode(mode)

    def _give_up(self, why: str) -> None:
        while self._pending:
            self._finished(self._pending.popleft(), why or "upgraded")
        self.mode = "opaque"
