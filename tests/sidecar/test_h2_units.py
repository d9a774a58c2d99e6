"""The pure parts of the HTTP/2 path: the h2 session adaptor (two sessions talking in memory),
request/response adaptation, the gRPC error mapping, and the gRPC retry conditions."""

from __future__ import annotations

import grpc as grpcio
import hyperframe.frame
import pytest

from mesh.model import Retries
from sidecar.http2 import grpc
from sidecar.http2.messages import (
    MessageError,
    failure_trailers,
    local_answer,
    parse_request,
    parse_response,
)
from sidecar.http2.session import (
    REFUSED_STREAM,
    WINDOW,
    Data,
    Event,
    GoneAway,
    H2Session,
    H2SessionError,
    Headers,
    Reset,
    Trailers,
    WindowOpened,
)
from sidecar.traffic.retry import RESET, STATUS, Outcome, retriable

REQ = (
    (":method", "POST"),
    (":scheme", "http"),
    (":authority", "api.shop:9090"),
    (":path", "/pkg.Svc/Call"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
)


def pair() -> tuple[H2Session, H2Session]:
    client, server = H2Session(client=True), H2Session(client=False)
    client.start()
    server.start()
    move(client, server)
    move(server, client)
    move(client, server)
    return client, server


def move(src: H2Session, dst: H2Session) -> list[Event]:
    return dst.receive(src.data_to_send())


def stream_events(events: list[Event]) -> list[Event]:
    return [e for e in events if not isinstance(e, WindowOpened)]


def test_a_request_with_body_and_trailers_is_folded_into_stream_events() -> None:
    client, server = pair()
    sid = client.new_stream()
    client.send_headers(sid, REQ)
    assert client.send_data(sid, b"hello", end=False) == 5
    client.send_headers(sid, (("x-trailer", "1"),), end=True)
    events = stream_events(move(client, server))
    assert events == [
        Headers(sid, REQ, end=False),
        Data(sid, b"hello", 5, end=False),
        Trailers(sid, (("x-trailer", "1"),)),
    ]


def test_a_trailers_only_answer_is_one_headers_event_with_end() -> None:
    client, server = pair()
    sid = client.new_stream()
    client.send_headers(sid, REQ, end=True)
    [head] = stream_events(move(client, server))
    assert head == Headers(sid, REQ, end=True)
    answer = local_answer(503, "max requests", "2 in flight, limit 2", for_grpc=True)
    server.send_headers(sid, answer.fields, end=True)
    [resp] = stream_events(move(server, client))
    assert isinstance(resp, Headers)
    assert resp.end
    parsed = parse_response(resp.headers, resp.end)
    assert parsed.status == 200
    assert parsed.grpc_status == grpc.UNAVAILABLE


def test_an_empty_final_data_frame_ends_the_stream_and_a_reset_is_reported() -> None:
    client, server = pair()
    a = client.new_stream()
    client.send_headers(a, REQ)
    client.end_stream(a)
    b = client.new_stream()
    client.send_headers(b, REQ)
    client.reset(b)
    events = stream_events(move(client, server))
    assert events[1] == Data(a, b"", 0, end=True)
    assert events[-1] == Reset(b, 8)


def test_send_data_stops_at_the_flow_control_window_until_acknowledged() -> None:
    client, server = pair()
    sid = client.new_stream()
    client.send_headers(sid, REQ)
    big = b"x" * (WINDOW + 10_000)
    sent = client.send_data(sid, big, end=True)
    assert sent == WINDOW  # our settings raised both windows to WINDOW
    got = [e for e in move(client, server) if isinstance(e, Data)]
    assert sum(len(e.data) for e in got) == WINDOW
    assert client.send_data(sid, big[sent:], end=True) == 0  # nothing acknowledged yet
    for e in got:
        server.ack(sid, e.flow)
    opened = move(server, client)
    assert any(isinstance(e, WindowOpened) for e in opened)
    assert client.send_data(sid, big[sent:], end=True) == 10_000


def test_garbage_is_a_session_error_and_goaway_is_reported() -> None:
    server = H2Session(client=False)
    server.start()
    with pytest.raises(H2SessionError):
        server.receive(b"GET / HTTP/1.1\r\n\r\n")
    client, server = pair()
    server.close(detail="bye")
    [gone] = [e for e in move(server, client) if isinstance(e, GoneAway)]
    assert (gone.code, gone.detail) == (0, "bye")


def test_streams_up_to_a_received_goaways_last_stream_still_complete() -> None:
    # RFC 9113 §6.8, as servers with a request limit do it: GOAWAY naming stream 1, then the
    # answer to stream 1, in one read. h2 alone would end the session at the GOAWAY
    # (python-hyper/h2#1181) and fail the answer as a protocol error.
    client, server = pair()
    sids = []
    for _ in range(2):
        sids.append(client.new_stream())
        client.send_headers(sids[-1], REQ, end=True)
    one, three = sids
    move(client, server)
    server.send_headers(one, ((":status", "200"),), end=True)
    goaway = hyperframe.frame.GoAwayFrame(0, last_stream_id=one, error_code=0).serialize()
    events = client.receive(goaway + server.data_to_send())
    [gone] = [e for e in events if isinstance(e, GoneAway)]
    assert gone.last_stream == one
    assert any(isinstance(e, Headers) and e.stream == one and e.end for e in events)
    assert client.gone_away
    client.reset(three, REFUSED_STREAM)  # the client may still end what the server refused
    assert client.data_to_send()


def test_request_adaptation() -> None:
    req = parse_request((*REQ, ("x-Case", "A")))
    assert (req.method, req.path, req.authority, req.grpc) == (
        "POST",
        "/pkg.Svc/Call",
        "api.shop:9090",
        True,
    )
    info = req.info()
    assert info.path == "/pkg.Svc/Call"
    assert info.headers["host"] == "api.shop:9090"
    assert info.headers["x-case"] == "A"
    assert req.fields()[:4] == REQ[:4]
    assert req.shadow().authority == "api.shop-shadow:9090"
    assert parse_request(((":method", "GET"), (":path", "/a?b"), ("host", "h"))).authority == "h"
    with pytest.raises(MessageError, match=":method"):
        parse_request(((":path", "/"),))
    with pytest.raises(MessageError, match="CONNECT"):
        parse_request(((":method", "CONNECT"), (":authority", "x:1")))
    with pytest.raises(MessageError, match=":status"):
        parse_response(((":status", "abc"),), end=True)


@pytest.mark.parametrize(
    ("status", "reason", "code"),
    [
        (504, "upstream timeout", grpc.DEADLINE_EXCEEDED),
        (503, "max requests", grpc.UNAVAILABLE),
        (503, "pending overflow", grpc.UNAVAILABLE),
        (503, "no route", grpc.UNAVAILABLE),
        (503, "upstream connect failure", grpc.UNAVAILABLE),
        (503, "fault abort", grpc.UNAVAILABLE),
        (404, "fault abort", grpc.UNIMPLEMENTED),
        (403, "fault abort", grpc.PERMISSION_DENIED),
        (418, "fault abort", grpc.UNKNOWN),
        (400, "malformed request", grpc.INTERNAL),
    ],
)
def test_grpc_error_mapping(status: int, reason: str, code: int) -> None:
    answer = local_answer(status, reason, "the detail", for_grpc=True)
    fields = dict(answer.fields)
    assert fields[":status"] == "200"
    assert fields["grpc-status"] == str(code)
    assert grpc.decode_message(fields["grpc-message"]) == f"{reason}: the detail"
    assert fields["x-fedgate-reason"] == reason
    assert answer.body == b""
    # The numbers are grpcio's own.
    assert code == next(c.value[0] for c in grpcio.StatusCode if c.value[0] == code)


def test_plain_http2_errors_and_failure_trailers() -> None:
    answer = local_answer(503, "max requests", "limit 2", for_grpc=False)
    assert dict(answer.fields)[":status"] == "503"
    assert answer.body == b"max requests: limit 2\n"
    trailers = dict(failure_trailers("upstream timeout", "response not done within timeout 1 s"))
    assert trailers["grpc-status"] == str(grpc.DEADLINE_EXCEEDED)


def test_grpc_message_encoding_round_trips() -> None:
    text = "100% sûr: ça\nmarche"
    encoded = grpc.encode_message(text)
    assert all(0x20 <= ord(c) < 0x7F for c in encoded)
    assert "%25" in encoded
    assert grpc.decode_message(encoded) == text
    assert grpc.decode_message("bad %zz escape") == "bad %zz escape"


def test_grpc_content_types() -> None:
    assert grpc.is_grpc("application/grpc")
    assert grpc.is_grpc("application/grpc+proto")
    assert not grpc.is_grpc("application/grpc-web")
    assert not grpc.is_grpc("application/json")
    assert not grpc.is_grpc(None)


def test_grpc_retry_conditions_and_outlier_judgement() -> None:
    unavailable = Outcome(STATUS, 200, grpc.UNAVAILABLE)
    assert retriable(Retries(2, retry_on=("unavailable",)), unavailable)
    assert not retriable(Retries(2, retry_on=("5xx",)), unavailable)  # :status is 200
    assert not retriable(Retries(2, retry_on=("unavailable",)), Outcome(STATUS, 200, 0))
    assert retriable(Retries(2, retry_on=("deadline-exceeded",)), Outcome(STATUS, 200, 4))
    assert retriable(Retries(2, retry_on=("unavailable", "reset")), Outcome(RESET))
    assert unavailable.failed  # counts as a 503 for outlier detection
    assert not Outcome(STATUS, 200, grpc.OK).failed
    assert not Outcome(STATUS, 200, 5).failed  # NOT_FOUND is the caller's problem
    assert grpc.http_status_of(grpc.UNAVAILABLE) == 503
