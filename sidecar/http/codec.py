"""HTTP/1.1 messages, sans I/O (RFC 9112), bounded: bytes in, events out; events in, bytes out.

`Reader` parses one direction of a connection (requests from the app, or responses from an
upstream) into `Request`/`Response`, `Data`, `EndOfMessage` and `ConnectionClosed` events, as
h11 does. It is strict where leniency lets two parsers disagree on where a message ends
(request smuggling, RFC 9112 §11.2): bare CR or LF in a head, whitespace before a header colon,
obsolete line folding, `Transfer-Encoding` together with `Content-Length`, conflicting
`Content-Length` values and transfer codings other than `chunked` in requests are refused with
`HttpProtocolError` (whose `status` the driver answers with: 400, 431, 501 or 505). Heads are
bounded (`MAX_HEAD`, `MAX_HEADERS`), chunk-size lines and trailers too; bodies stream through
as `Data` of whatever arrived, never accumulated here.

Trailers are read and dropped. The encoders are in `sidecar.http.encode`; the parser's rules
change together, hence a module a little over 400 lines. What this module does
not do: I/O, HTTP/2, request pipelining decisions (the driver reads the next request only after
answering the previous one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar.errors import SidecarError

MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
MAX_CHUNK_LINE = 1024
MAX_TRAILERS = 16 * 1024
MAX_LENGTH = 1 << 62

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs except HTAB (RFC 9110 §5.5)
_STATUS = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: (.*))?")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class HttpProtocolError(SidecarError):
    """A peer sent something that is not acceptable HTTP/1.1; `status` is what to answer a
    client with (a malformed response from an upstream becomes a 502 by the driver)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


Headers = tuple[tuple[str, str], ...]


def _get(headers: Headers, name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name), None)


def tokens(headers: Headers, name: str) -> list[str]:
    """Comma-separated list values of every `name` header, lower-cased."""
    out: list[str] = []
    for k, v in headers:
        if k.lower() == name:
            out.extend(t.strip().lower() for t in v.split(",") if t.strip())
    return out


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    version: str  # "1.1" or "1.0"
    headers: Headers

    def get(self, name: str) -> str | None:
        """The first value of header `name` (lower-case), or None."""
        return _get(self.headers, name)

    @property
    def keep_alive(self) -> bool:
        """Whether the client lets the connection carry another request (RFC 9112 §9.3)."""
        conn = tokens(self.headers, "connection")
        return "close" not in conn if self.version == "1.1" else "keep-alive" in conn

    @property
    def upgrade(self) -> bool:
        return "upgrade" in tokens(self.headers, "connection") and self.get("upgrade") is not None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    version: str
    headers: Headers

    def get(self, name: str) -> str | None:
        return _get(self.headers, name)

    @property
    def keep_alive(self) -> bool:
        conn = tokens(self.headers, "connection")
        return "close" not in conn if self.version == "1.1" else "keep-alive" in conn


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    pass


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer ended its direction cleanly between messages."""


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()
Event = Request | Response | Data | EndOfMessage | ConnectionClosed


@dataclass(frozen=True, slots=True)
class Framing:
    """How a body is delimited: none, length, chunked, or close (until the connection ends)."""

    kind: str
    length: int = 0


NO_BODY = Framing("none")
CHUNKED = Framing("chunked")
UNTIL_CLOSE = Framing("close")


def _content_length(values: list[str], status: int) -> int:
    """RFC 9110 §8.6: identical repeated values are one value; anything else is an error."""
    seen = {v.strip() for raw in values for v in raw.split(",")}
    if len(seen) != 1:
        raise HttpProtocolError(status, f"conflicting Content-Length values {sorted(seen)}")
    (text,) = seen
    if not text.isdigit() or not text.isascii() or len(text) > 18:
        raise HttpProtocolError(status, f"malformed Content-Length {text!r}")
    return int(text)


def request_framing(req: Request) -> Framing:
    te = tokens(req.headers, "transfer-encoding")
    cl = [v for k, v in req.headers if k.lower() == "content-length"]
    if te:
        if req.version == "1.0":
            raise HttpProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if cl:
            raise HttpProtocolError(400, "both Transfer-Encoding and Content-Length")
        if te != ["chunked"]:
            raise HttpProtocolError(501, f"transfer coding {', '.join(te)} not supported")
        return CHUNKED
    if cl:
        n = _content_length(cl, 400)
        return Framing("length", n) if n else NO_BODY
    return NO_BODY


def response_framing(resp: Response, method: str) -> Framing:
    """RFC 9112 §6.3, for the response to a request with `method`."""
    if method == "HEAD" or resp.status < 200 or resp.status in (204, 304):
        return NO_BODY
    te = tokens(resp.headers, "transfer-encoding")
    if te:
        if te[-1] != "chunked":
            return UNTIL_CLOSE
        if te != ["chunked"]:
            raise HttpProtocolError(502, f"upstream transfer coding {', '.join(te)} not supported")
        return CHUNKED
    cl = [v for k, v in resp.headers if k.lower() == "content-length"]
    if cl:
        n = _content_length(cl, 502)
        return Framing("length", n) if n else Framing("length", 0)
    return UNTIL_CLOSE


def _parse_headers(lines: list[bytes], status: int) -> Headers:
    if len(lines) > MAX_HEADERS:
        raise HttpProtocolError(431 if status == 400 else status, f"over {MAX_HEADERS} headers")
    out = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            # Also catches obs-fold (a line starting with whitespace) and "Name : value".
            raise HttpProtocolError(status, f"malformed header line {line[:60]!r}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise HttpProtocolError(status, f"control character in header {name.decode()!r}")
        out.append((name.decode("ascii"), value.decode("latin-1")))
    return tuple(out)


def _head_lines(head: bytes, status: int) -> list[bytes]:
    lines = head.split(b"\r\n")
    # Each CRLF holds one CR and one LF, so any other CR or LF shows in the counts: two passes
    # in C instead of a generator over the lines (this ran on every head).
    pairs = len(lines) - 1
    if head.count(b"\r") != pairs or head.count(b"\n") != pairs:
        raise HttpProtocolError(status, "bare CR or LF in the message head")
    return lines


def parse_request_head(head: bytes) -> Request:
    lines = _head_lines(head, 400)
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise HttpProtocolError(400, f"malformed request line {lines[0][:80]!r}")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/"):
            raise HttpProtocolError(505, f"{version.decode('latin-1')} not supported")
        raise HttpProtocolError(400, f"malformed request line {lines[0][:80]!r}")
    return Request(
        method.decode("ascii"),
        target.decode("latin-1"),
        version[5:].decode("ascii"),
        _parse_headers(lines[1:], 400),
    )


def parse_response_head(head: bytes) -> Response:
    lines = _head_lines(head, 502)
    m = _STATUS.fullmatch(lines[0])
    if m is None:
        raise HttpProtocolError(502, f"malformed status line {lines[0][:80]!r}")
    reason = m.group(3) or b""
    if _BAD_VALUE.search(reason):
        raise HttpProtocolError(502, "control character in the reason phrase")
    return Response(
        int(m.group(2)),
        reason.decode("latin-1"),
        "1." + m.group(1).decode(),
        _parse_headers(lines[1:], 502),
    )


class Reader:
    """Parses one direction of an HTTP/1.1 connection. `role`: "request" or "response".

    Feed bytes with `feed` (and `feed_eof`), then call `next_event` until it returns
    `NEED_DATA`. After `EndOfMessage`, `next_message` readies it for the next one. For
    responses, `expect(method)` first says what the request was (HEAD has no body).
    """

    def __init__(self, role: str, max_head: int = MAX_HEAD) -> None:
        assert role in ("request", "response")
        self.role = role
        self.max_head = max_head
        self._buf = bytearray()
        self._eof = False
        self.untouched = True  # not one byte fed yet (an unprocessed request, on a response)
        self.state = "head"  # head | body | done
        self.framing = NO_BODY
        self._method = "GET"
        self._left = 0  # bytes left in a length body or in the current chunk
        self._chunk = "size"  # size | data | crlf | trailer
        self._trailer_bytes = 0

    @property
    def _status(self) -> int:
        return 400 if self.role == "request" else 502

    def feed(self, data: bytes) -> None:
        if data:
            self._buf += data
            self.untouched = False

    def feed_eof(self) -> None:
        self._eof = True

    def expect(self, method: str) -> None:
        self._method = method

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_buffer(self) -> bytes:
        """Bytes received past the last event (e.g. after a 101 Switching Protocols)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def next_message(self) -> None:
        assert self.state == "done", f"next_message in state {self.state}"
        self.state = "head"

    def next_event(self) -> Event | NeedData:
        if self.state == "head":
            return self._head()
        if self.state == "body":
            return self._body()
        raise AssertionError("next_event after EndOfMessage without next_message")

    # -- head -------------------------------------------------------------------------------

    def _head(self) -> Event | NeedData:
        buf = self._buf
        if self.role == "request":
            while buf[:2] == b"\r\n":  # RFC 9112 §2.2: ignore empty lines before a request
                del buf[:2]
        end = buf.find(b"\r\n\r\n", 0, self.max_head + 4)
        if end < 0:
            if len(buf) > self.max_head:
                raise HttpProtocolError(
                    431 if self.role == "request" else 502,
                    f"message head over {self.max_head} bytes",
                )
            if self._eof:
                if not buf:
                    return ConnectionClosed()
                raise HttpProtocolError(self._status, "connection closed inside a message head")
            return NEED_DATA
        head = bytes(buf[:end])
        del buf[: end + 4]
        if self.role == "request":
            req = parse_request_head(head)
            self.framing = request_framing(req)
            self._start_body()
            return req
        resp = parse_response_head(head)
        self.framing = response_framing(resp, self._method)
        if resp.status < 200:
            return resp  # interim: the final response follows (101: the protocol changes)
        self._start_body()
        return resp

    def _start_body(self) -> None:
        self.state = "body"
        self._left = self.framing.length
        self._chunk = "size"
        self._trailer_bytes = 0

    # -- body -------------------------------------------------------------------------------

    def _end(self) -> EndOfMessage:
        self.state = "done"
        return EndOfMessage()

    def _body(self) -> Event | NeedData:
        kind = self.framing.kind
        if kind == "none":
            return self._end()
        if kind == "length":
            return self._counted(self._left, truncated="body")
        if kind == "close":
            if self._buf:
                return Data(self.take_buffer())
            return self._end() if self._eof else NEED_DATA
        return self._chunked()

    def _counted(self, left: int, truncated: str) -> Event | NeedData:
        if left == 0 and self.framing.kind == "length":
            return self._end()
        if not self._buf:
            if self._eof:
                raise HttpProtocolError(self._status, f"connection closed inside a {truncated}")
            return NEED_DATA
        n = min(left, len(self._buf))
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._left -= n
        return Data(data)

    def _line(self, limit: int, what: str) -> bytes | None:
        end = self._buf.find(b"\r\n", 0, limit + 2)
        if end < 0:
            if len(self._buf) > limit:
                raise HttpProtocolError(self._status, f"{what} over {limit} bytes")
            if self._eof:
                raise HttpProtocolError(self._status, f"connection closed inside a {what}")
            return None
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        if b"\r" in line or b"\n" in line:
            raise HttpProtocolError(self._status, f"bare CR or LF in a {what}")
        return line

    def _chunked(self) -> Event | NeedData:
        while True:
            if self._chunk == "size":
                line = self._line(MAX_CHUNK_LINE, "chunk size line")
                if line is None:
                    return NEED_DATA
                size = line.split(b";", 1)[0].rstrip(b" \t")
                if not _HEX.fullmatch(size):
                    raise HttpProtocolError(self._status, f"malformed chunk size {line[:40]!r}")
                self._left = int(size, 16)
                if self._left > MAX_LENGTH:
                    raise HttpProtocolError(self._status, "chunk too large")
                self._chunk = "data" if self._left else "trailer"
            elif self._chunk == "data":
                if self._left == 0:
                    self._chunk = "crlf"
                    continue
                return self._counted(self._left, truncated="chunk")
            elif self._chunk == "crlf":
                if len(self._buf) < 2:
                    if self._eof:
                        raise HttpProtocolError(self._status, "connection closed inside a chunk")
                    return NEED_DATA
                if self._buf[:2] != b"\r\n":
                    raise HttpProtocolError(self._status, "chunk data not followed by CRLF")
                del self._buf[:2]
                self._chunk = "size"
            else:  # trailer section (RFC 9112 §7.1.2): read and dropped
                line = self._line(MAX_TRAILERS - self._trailer_bytes, "trailer section")
                if line is None:
                    return NEED_DATA
                self._trailer_bytes += len(line) + 2
                if not line:
                    return self._end()
                _parse_headers([line], self._status)
