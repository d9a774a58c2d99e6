"""The HTTP/1.1 codec: round trips under any segmentation (Hypothesis), smuggling refusals,
bounds, response framing, and a fuzz of the parser with arbitrary bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.http.codec import (
    MAX_HEAD,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Event,
    Framing,
    HttpProtocolError,
    NeedData,
    Reader,
    Request,
    Response,
)
from sidecar.http.encode import (
    HOP_BY_HOP,
    LAST_CHUNK,
    encode_chunk,
    encode_request,
    encode_response,
    forwardable,
    local_response,
)

TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(str.strip)


def feed_all(reader: Reader, data: bytes, cuts: list[int]) -> list[Event]:
    """Feed `data` split at `cuts`, then EOF; return every event."""
    events: list[Event] = []
    pos = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        reader.feed(data[pos:cut])
        pos = max(pos, cut)
        events += drain(reader)
    return events


def drain(reader: Reader) -> list[Event]:
    out: list[Event] = []
    while reader.state != "done":
        ev = reader.next_event()
        if isinstance(ev, NeedData):
            break
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            break
    return out


def body_of(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Data))


@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]),
    path=st.text("abc/xyz-_.~%0123456789", max_size=40).map(lambda p: "/" + p),
    headers=st.lists(st.tuples(TOKEN.map(str.title), VALUE), max_size=8),
    body=st.binary(max_size=3000),
    chunked=st.booleans(),
    pieces=st.lists(st.integers(1, 700), max_size=6),
    cuts=st.lists(st.integers(0, 5000), max_size=8),
)
@settings(max_examples=300, deadline=None)
def test_requests_round_trip_under_any_segmentation(
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes,
    chunked: bool,
    pieces: list[int],
    cuts: list[int],
) -> None:
    headers = [
        (k, v) for k, v in headers if k.lower() not in {*HOP_BY_HOP, "content-length", "expect"}
    ]  # the encoder drops hop-by-hop headers and writes its own framing
    req = Request(method, path, "1.1", (("Host", "api"), *headers))
    if chunked:
        wire = encode_request(req, Framing("chunked"))
        at = 0
        for size in pieces:
            wire += encode_chunk(body[at : at + size])
            at += size
        wire += encode_chunk(body[at:]) + LAST_CHUNK
    else:
        wire = encode_request(req, Framing("length", len(body))) + body
    reader = Reader("request")
    events = feed_all(reader, wire, cuts)
    head = events[0]
    assert isinstance(head, Request)
    assert (head.method, head.target, head.version) == (method, path, "1.1")
    assert [
        h for h in head.headers if h[0].lower() not in ("content-length", "transfer-encoding")
    ] == list(req.headers)
    assert body_of(events) == body
    assert isinstance(events[-1], EndOfMessage)
    assert reader.buffered == 0


@given(body=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 3000), max_size=6))
@settings(max_examples=100, deadline=None)
def test_close_delimited_and_chunked_responses(body: bytes, cuts: list[int]) -> None:
    resp = Response(200, "OK", "1.1", ())
    reader = Reader("response")
    wire = encode_response(resp, Framing("close")) + body
    events = feed_all(reader, wire, cuts)
    reader.feed_eof()
    events += drain(reader)
    assert body_of(events) == body
    assert isinstance(events[-1], EndOfMessage)
    reader = Reader("response")
    events = feed_all(
        reader, encode_response(resp, Framing("chunked")) + encode_chunk(body) + LAST_CHUNK, cuts
    )
    assert body_of(events) == body
    assert isinstance(events[-1], EndOfMessage)


@given(st.binary(max_size=400))
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes_only_ever_raise_protocol_errors(data: bytes) -> None:
    for role in ("request", "response"):
        reader = Reader(role)
        status = 0
        try:
            reader.feed(data)
            drain(reader)
            reader.feed_eof()
            drain(reader)
        except HttpProtocolError as e:
            status = e.status
        assert status == 0 or 400 <= status <= 505


@given(st.binary(min_size=1, max_size=64))
def test_fuzzed_request_heads_after_a_valid_prefix(junk: bytes) -> None:
    reader = Reader("request")
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\n" + junk + b"\r\n\r\n")
    status = 400
    try:
        drain(reader)
    except HttpProtocolError as e:
        status = e.status
    assert status in (400, 431, 501)


SMUGGLING = [
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", 400),  # obs-fold
    (b"GET / HTTP/1.1\r\nX: a\nY: b\r\n\r\n", 400),  # bare LF
    (b"GET / HTTP/1.1\r\nX: a\rY: b\r\n\r\n", 400),  # bare CR
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET /a b HTTP/1.1\r\n\r\n", 400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY", 400),
]


@pytest.mark.parametrize(("wire", "status"), SMUGGLING)
def test_ambiguous_or_malformed_requests_are_refused(wire: bytes, status: int) -> None:
    reader = Reader("request")
    reader.feed(wire)
    with pytest.raises(HttpProtocolError) as info:
        drain(reader)
    assert info.value.status == status


def test_identical_repeated_content_length_is_one_value_and_leading_crlf_is_ignored() -> None:
    reader = Reader("request")
    reader.feed(b"\r\nPOST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi")
    events = drain(reader)
    assert body_of(events) == b"hi"


def test_heads_are_bounded() -> None:
    reader = Reader("request")
    reader.feed(b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * MAX_HEAD)
    with pytest.raises(HttpProtocolError) as info:
        drain(reader)
    assert info.value.status == 431
    reader = Reader("request")
    reader.feed(b"GET / HTTP/1.1\r\n" + b"X: a\r\n" * 101 + b"\r\n")
    with pytest.raises(HttpProtocolError) as info:
        drain(reader)
    assert info.value.status == 431


def test_chunk_extensions_and_trailers_are_accepted_and_trailers_dropped() -> None:
    reader = Reader("request")
    reader.feed(
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;name=value\r\nabc\r\n0\r\nX-Checksum: 1\r\n\r\nGET /next HTTP/1.1\r\n\r\n"
    )
    events = drain(reader)
    assert body_of(events) == b"abc"
    reader.next_message()
    nxt = drain(reader)
    assert isinstance(nxt[0], Request)
    assert nxt[0].target == "/next"


def test_response_framing_by_method_and_status() -> None:
    for method, status, wire, body in [
        ("HEAD", 200, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b""),
        ("GET", 204, b"HTTP/1.1 204 No Content\r\n\r\n", b""),
        ("GET", 304, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", b""),
        ("GET", 200, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiXX", b"hi"),
    ]:
        reader = Reader("response")
        reader.expect(method)
        reader.feed(wire)
        events = drain(reader)
        assert isinstance(events[0], Response)
        assert events[0].status == status
        assert body_of(events) == body
        assert isinstance(events[-1], EndOfMessage)


def test_interim_responses_come_before_the_final_one() -> None:
    reader = Reader("response")
    reader.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    first = reader.next_event()
    assert isinstance(first, Response)
    assert first.status == 100
    events = drain(reader)
    assert isinstance(events[0], Response)
    assert events[0].status == 200


def test_eof_between_messages_is_a_clean_close_and_inside_one_an_error() -> None:
    reader = Reader("request")
    reader.feed_eof()
    assert isinstance(reader.next_event(), ConnectionClosed)
    reader = Reader("response")
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    reader.feed_eof()
    with pytest.raises(HttpProtocolError, match="closed inside a body"):
        drain(reader)


def test_keep_alive_rules() -> None:
    def req(version: str, *headers: tuple[str, str]) -> Request:
        return Request("GET", "/", version, headers)

    assert req("1.1").keep_alive
    assert not req("1.1", ("Connection", "close")).keep_alive
    assert not req("1.0").keep_alive
    assert req("1.0", ("Connection", "Keep-Alive")).keep_alive


def test_forwarded_heads_drop_hop_by_hop_headers_and_use_our_framing() -> None:
    req = Request(
        "POST",
        "/x",
        "1.0",
        (
            ("Host", "api"),
            ("Connection", "keep-alive, X-Secret"),
            ("X-Secret", "hop"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Content-Length", "3"),
            ("X-App", "kept"),
        ),
    )
    wire = encode_request(req, Framing("length", 3))
    assert wire == (b"POST /x HTTP/1.1\r\nHost: api\r\nX-App: kept\r\nContent-Length: 3\r\n\r\n")
    assert forwardable((("Upgrade", "websocket"),), upgrade=True) == [("Upgrade", "websocket")]
    resp = Response(200, "OK", "1.1", (("Transfer-Encoding", "chunked"), ("X-A", "1")))
    assert encode_response(resp, Framing("length", 5), close=True) == (
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
    )


def test_local_responses_carry_the_reason() -> None:
    wire = local_response(503, "pending overflow", "1/1 connections busy")
    reader = Reader("response")
    reader.feed(wire)
    events = drain(reader)
    head = events[0]
    assert isinstance(head, Response)
    assert head.status == 503
    assert head.get("x-fedgate-reason") == "pending overflow"
    assert body_of(events) == b"503 pending overflow: 1/1 connections busy\n"
