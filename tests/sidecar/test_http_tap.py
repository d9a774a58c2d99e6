"""The destination's passive HTTP tap: requests matched to responses, whatever the chunking."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.http.codec import Request
from sidecar.http.tap import Exchange, HttpTap

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
REQUESTS = (
    f"GET /a HTTP/1.1\r\nHost: x\r\ntraceparent: {TP}\r\n\r\n".encode()
    + b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    + b"HEAD /c HTTP/1.1\r\nHost: x\r\n\r\n"
)
RESPONSES = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    + b"HTTP/1.1 100 Continue\r\n\r\n"
    + b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    + b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"  # HEAD: no body follows
)


class Seen:
    def __init__(self) -> None:
        self.started: list[tuple[str, str, str | None]] = []
        self.finished: list[tuple[str, int, int, int, str]] = []
        self.modes: list[str] = []
        self.tap = HttpTap(self.start, self.finish, self.modes.append)

    def start(self, request: Request, exchange: Exchange) -> Any:
        self.started.append((request.method, request.target, request.get("traceparent")))
        return len(self.started)

    def finish(self, e: Exchange, error: str) -> None:
        self.finished.append((e.method, e.status, e.request_bytes, e.response_bytes, error))


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


EXPECTED = [("GET", 200, 0, 2, ""), ("POST", 503, 5, 3, ""), ("HEAD", 204, 0, 0, "")]


def test_requests_and_responses_are_matched_in_order() -> None:
    seen = Seen()
    seen.tap.from_caller(REQUESTS)
    assert seen.started == [("GET", "/a", TP), ("POST", "/b", None), ("HEAD", "/c", None)]
    seen.tap.from_app(RESPONSES)
    assert seen.finished == EXPECTED
    assert seen.modes == ["http"]
    seen.tap.close("")
    assert seen.finished == EXPECTED  # nothing was pending


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 400), max_size=8), st.lists(st.integers(0, 400), max_size=8))
def test_any_chunking_gives_the_same_exchanges(req_cuts: list[int], resp_cuts: list[int]) -> None:
    seen = Seen()
    for chunk in _chunks(REQUESTS, req_cuts):
        seen.tap.from_caller(chunk)
    for chunk in _chunks(RESPONSES, resp_cuts):
        seen.tap.from_app(chunk)
    assert seen.finished == EXPECTED


def test_a_response_read_until_close_ends_with_the_connection() -> None:
    seen = Seen()
    seen.tap.from_caller(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    seen.tap.from_app(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nsome body")
    assert seen.finished == []
    seen.tap.close("")
    assert seen.finished == [("GET", 200, 0, 9, "")]


def test_unanswered_requests_end_with_the_connection_error() -> None:
    seen = Seen()
    seen.tap.from_caller(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    seen.tap.close("upstream reset")
    assert seen.finished == [("GET", 0, 0, 0, "upstream reset")]


def test_not_http_is_left_alone() -> None:
    seen = Seen()
    seen.tap.from_caller(b"\x16\x03\x01 binary")
    seen.tap.from_app(b"whatever")
    assert (seen.modes, seen.started, seen.tap.mode) == (["opaque"], [], "opaque")
    server_first = Seen()
    server_first.tap.from_app(b"220 smtp ready\r\n")
    assert server_first.modes == ["opaque"]


def test_a_verdict_waits_for_enough_bytes() -> None:
    seen = Seen()
    seen.tap.from_caller(b"GE")
    assert seen.modes == []
    seen.tap.from_caller(b"T / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert seen.started == [("GET", "/", None)]


def test_an_upgrade_or_garbage_stops_the_watching() -> None:
    seen = Seen()
    upgrade = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n"
    seen.tap.from_caller(upgrade)
    seen.tap.from_app(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ws\r\n\r\n\x81\x05hello")
    assert seen.finished == [("GET", 101, 0, 0, "")]
    assert seen.tap.mode == "opaque"
    broken = Seen()
    broken.tap.from_caller(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    broken.tap.from_app(b"NOT HTTP AT ALL\r\n\r\n")
    assert broken.finished[0][0] == "GET"
    assert broken.finished[0][4].startswith("unparsed response")
    assert broken.tap.mode == "opaque"
