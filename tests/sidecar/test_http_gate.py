"""The HTTP/1.1 authorization gate (sidecar.http.gate), pure: bytes in, bytes for the app out."""

from __future__ import annotations

import pytest

from mesh.authz import AuthzDecision
from sidecar.http.codec import HttpProtocolError, Request
from sidecar.http.gate import H1Gate

ALLOW = AuthzDecision(True, "ok")
DENY = AuthzDecision(False, "denied by authorization policy demo/no-private", "demo/no-private")


def decide(req: Request) -> AuthzDecision:
    return DENY if req.target.startswith("/private") else ALLOW


GET_OK = b"GET /ok HTTP/1.1\r\nhost: a\r\n\r\n"
POST_OK = b"POST /ok HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello"
GET_PRIVATE = b"GET /private HTTP/1.1\r\nhost: a\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


def test_admitted_requests_pass_byte_for_byte_even_split_anywhere() -> None:
    stream = GET_OK + POST_OK + GET_OK
    for cut in range(1, len(stream)):
        gate = H1Gate(decide)
        out = gate.from_caller(stream[:cut]) + gate.from_caller(stream[cut:])
        assert out == stream, cut
        assert gate.admitted == 3
        assert gate.refused is None


def test_a_head_is_held_until_decided_and_a_refused_request_never_passes() -> None:
    gate = H1Gate(decide)
    assert gate.from_caller(GET_PRIVATE[:10]) == b""  # an incomplete head waits
    assert gate.from_caller(GET_PRIVATE[10:] + GET_OK) == b""  # refused: nothing, nor after
    assert gate.refused is not None
    assert gate.refused[1] is DENY
    assert gate.refusal_due  # nothing was forwarded before it
    assert gate.from_caller(GET_OK) == b""


def test_a_refusal_waits_for_the_responses_before_it() -> None:
    gate = H1Gate(decide)
    assert gate.from_caller(GET_OK + POST_OK + GET_PRIVATE) == GET_OK + POST_OK
    assert not gate.refusal_due
    gate.from_app(RESPONSE)
    assert not gate.refusal_due
    gate.from_app(RESPONSE[:20])
    assert not gate.refusal_due
    gate.from_app(RESPONSE[20:])
    assert gate.refusal_due


def test_chunked_bodies_pass_whole() -> None:
    body = b"POST /ok HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    gate = H1Gate(decide)
    out = b"".join(gate.from_caller(body[i : i + 3]) for i in range(0, len(body), 3))
    assert out + gate.from_caller(GET_PRIVATE) == body


def test_an_upgrade_holds_what_follows_until_the_app_answers() -> None:
    upgrade = b"GET /ws HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    gate = H1Gate(decide)
    assert gate.from_caller(upgrade + GET_PRIVATE) == upgrade
    # The app declines the upgrade: what was held is parsed as HTTP again, and refused.
    assert gate.from_app(RESPONSE) == b""
    assert gate.refused is not None

    gate = H1Gate(decide)
    assert gate.from_caller(upgrade + b"\x81\x05frame") == upgrade
    switching = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"
    assert gate.from_app(switching) == b"\x81\x05frame"  # 101: opaque from now on
    assert gate.from_caller(GET_PRIVATE) == GET_PRIVATE


def test_malformed_requests_raise_for_the_driver() -> None:
    with pytest.raises(HttpProtocolError):
        H1Gate(decide).from_caller(b"GET /x HTTP/1.1\r\nbad header\r\n\r\n")
