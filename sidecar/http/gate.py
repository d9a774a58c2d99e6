"""Authorizing each HTTP/1.1 request of an inbound connection before the app sees it. Pure.

The destination sidecar relays an inbound connection's bytes to the app unchanged; when the
service has AuthorizationPolicies that need each request (`mesh.authz`), the caller's bytes go
through an `H1Gate` first. It parses them with the same `Reader` as the tap and the source
side, holds a request's head until it is complete, asks `decide` about it, and then lets
exactly the raw bytes of an admitted request (head and body as they come) through. The first
refused request ends the forwarding: nothing of it, or after it, reaches the app, and once the
responses to the requests before it are complete (`from_app` follows them, as HTTP/1.1 answers
in order, RFC 9112 §9.3.2) the driver answers 403 and closes (`refusal_due`).

An admitted upgrade request (`Connection: upgrade`) holds everything the caller sends after it
until the app answers: a 101 turns both directions into opaque bytes, anything else resumes
the parsing, so a refused upgrade cannot smuggle an unchecked request behind it. A parse error
(`HttpProtocolError`) reaches the driver, which answers it and closes.

No I/O, no clock. What it does not do: rewrite requests, or HTTP/2 (`sidecar.inbound_gate`
terminates that).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from mesh.authz import AuthzDecision
from sidecar.http.codec import (
    NEED_DATA,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Reader,
    Request,
    Response,
)


class H1Gate:
    def __init__(self, decide: Callable[[Request], AuthzDecision]) -> None:
        self._decide = decide
        self._requests = Reader("request")
        self._responses = Reader("response")
        self._raw = bytearray()  # fed to `_requests`, not forwarded yet
        self._methods: deque[str] = deque()  # of forwarded requests still unanswered
        self._held = bytearray()  # what came after an upgrade request, until its answer
        self._upgrading = False
        self.opaque = False  # upgraded (101): bytes pass both ways unparsed
        self.refused: tuple[Request, AuthzDecision] | None = None
        self.admitted = 0

    @property
    def refusal_due(self) -> bool:
        """A request was refused and every response before it is complete."""
        return self.refused is not None and not self._methods

    # -- caller -> app ----------------------------------------------------------------------

    def from_caller(self, data: bytes) -> bytes:
        """What of `data` (and of what came before) may go to the app now."""
        if self.opaque:
            return data
        if self.refused is not None:
            return b""
        if self._upgrading:
            self._held += data
            return b""
        self._raw += data
        self._requests.feed(data)
        out = bytearray()
        while True:
            event = self._requests.next_event()  # HttpProtocolError: the driver answers it
            consumed = len(self._raw) - self._requests.buffered
            match event:
                case Request():
                    decision = self._decide(event)
                    if not decision.allowed:
                        self.refused = (event, decision)
                        self._raw.clear()
                        return bytes(out)
                    self.admitted += 1
                    self._methods.append(event.method)
                    self._take(out, consumed)
                    if event.upgrade:
                        # Hold the rest: it is another protocol only if the app says 101.
                        self._upgrading = True
                        self._held += self._raw
                        self._raw.clear()
                        self._requests = Reader("request")
                        return bytes(out)
                case Data():
                    self._take(out, consumed)
                case EndOfMessage():
                    self._take(out, consumed)
                    self._requests.next_message()
                case ConnectionClosed():
                    return bytes(out)
                case _:
                    assert event is NEED_DATA, f"unexpected {event!r}"
                    self._take(out, consumed)  # body bytes parsed so far; a head waits whole
                    return bytes(out)

    def _take(self, out: bytearray, n: int) -> None:
        out += self._raw[:n]
        del self._raw[:n]

    # -- app -> caller ----------------------------------------------------------------------

    def from_app(self, data: bytes) -> bytes:
        """Follow the app's responses (they pass unchanged); returns caller bytes that may go
        to the app now (what an upgrade request held back)."""
        if self.opaque or not self._methods:
            return b""
        self._responses.feed(data)
        while self._methods:
            if self._responses.state == "head":
                self._responses.expect(self._methods[0])
            event = self._responses.next_event()  # HttpProtocolError: the driver closes
            match event:
                case Response(status=101) if self._upgrading:
                    self.opaque = True
                    self._methods.clear()
                    held, self._held = bytes(self._held), bytearray()
                    return held
                case Response():
                    continue
                case EndOfMessage():
                    self._methods.popleft()
                    self._responses.next_message()
                    if self._upgrading and not self._methods:
                        self._upgrading = False  # refused upgrade: parse what it held
                        held, self._held = bytes(self._held), bytearray()
                        return self.from_caller(held)
                case Data():
                    continue
                case _:
                    return b""
        return b""
