"""W3C traceparent: the spec's examples, its rules for invalid values, and fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import codec, connect, tracecontext
from mesh.errors import CodecError
from mesh.naming import ServiceKey
from mesh.tracecontext import TraceParent, new_root, parse

# The example of W3C Trace Context level 1, section 3.2.
EXAMPLE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_parses_the_spec_example() -> None:
    tp = parse(EXAMPLE)
    assert tp == TraceParent("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1)
    assert tp.sampled
    assert tp.format() == EXAMPLE


@pytest.mark.parametrize(
    "value",
    [
        "",
        EXAMPLE.upper(),  # upper-case hex is invalid (3.2.2.x: lowercase only)
        "ff" + EXAMPLE[2:],  # version ff is forbidden
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",  # all-zero parent id
        EXAMPLE + "-extra",  # version 00 is exactly 55 characters
        EXAMPLE[:-1],
        EXAMPLE.replace("-", "_", 1),
        "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",  # not hex
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        "x" * 5000,  # over MAX_LENGTH
    ],
)
def test_invalid_values_are_ignored(value: str) -> None:
    assert parse(value) is None


def test_a_future_version_is_read_by_its_first_fields() -> None:
    tp = parse("01" + EXAMPLE[2:] + "-what-comes-next")
    assert tp is not None
    assert tp.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert parse("01" + EXAMPLE[2:] + "x") is None  # extra fields come after a dash


def test_new_root_and_child_keep_the_trace() -> None:
    root = new_root(bytes(range(16)), b"\x01" * 8, sampled=False)
    assert not root.sampled
    assert root.format().endswith("-00")
    child = root.child(b"\x02" * 8)
    assert child.trace_id == root.trace_id
    assert child.span_id == "02" * 8
    assert new_root(bytes(16), bytes(8)).format() == "00-" + "0" * 31 + "1-" + "0" * 15 + "1-01"
    with pytest.raises(ValueError, match="16 bytes"):
        new_root(b"short", bytes(8))
    with pytest.raises(ValueError, match="non-zero hex"):
        TraceParent("0" * 32, "1" * 16)


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=8, max_size=8), st.booleans())
def test_format_then_parse_round_trips(trace: bytes, span: bytes, sampled: bool) -> None:
    tp = new_root(trace, span, sampled)
    assert parse(tp.format()) == tp


@given(st.text(max_size=300))
def test_parse_never_raises(value: str) -> None:
    tp = parse(value)
    assert tp is None or len(tp.format()) == 55


# --- carried by the stream header, its reply and the CONNECT ------------------------------------

KEY = ServiceKey("demo", "echo")


def _frame(obj: dict[str, object]) -> bytes:
    body = codec.dumps(obj)
    return codec.HEADER_MAGIC + len(body).to_bytes(2, "big") + body


def test_stream_header_traceparent_is_optional_and_validated() -> None:
    old = _frame({"ns": "demo", "svc": "echo", "port": 8080, "cluster": "west"})
    parsed = codec.split_frame(old)
    assert parsed is not None
    assert codec.header_from_json(parsed[0]).traceparent == ""  # an older peer: none
    bad = _frame({"ns": "demo", "svc": "echo", "port": 8080, "cluster": "", "traceparent": "zz"})
    parsed = codec.split_frame(bad)
    assert parsed is not None
    assert codec.header_from_json(parsed[0]).traceparent == ""  # invalid: dropped, not refused
    wrong = _frame({"ns": "demo", "svc": "echo", "port": 8080, "cluster": "", "traceparent": 7})
    parsed = codec.split_frame(wrong)
    assert parsed is not None
    with pytest.raises(CodecError, match="traceparent"):
        codec.header_from_json(parsed[0])
    wire = codec.encode_header(codec.StreamHeader(KEY, 8080, "west", EXAMPLE))
    parsed = codec.split_frame(wire)
    assert parsed is not None
    assert codec.header_from_json(parsed[0]).traceparent == EXAMPLE


def test_stream_reply_carries_a_traceparent_only_when_set() -> None:
    plain = codec.encode_reply(codec.StreamReply(200))
    assert b"traceparent" not in plain  # older decoders see exactly what they did before
    parsed = codec.split_frame(codec.encode_reply(codec.StreamReply(200, "", EXAMPLE)))
    assert parsed is not None
    assert codec.reply_from_json(parsed[0]) == codec.StreamReply(200, "", EXAMPLE)


def test_connect_response_traceparent() -> None:
    head = connect.encode_response(200, "Connection established", EXAMPLE)
    assert connect.parse_response(head[:-4]) == (200, "Connection established")
    assert connect.response_traceparent(head[:-4]) == EXAMPLE
    assert connect.encode_response(200, "ok", "garbage") == b"HTTP/1.1 200 ok\r\n\r\n"
    assert connect.response_traceparent(b"HTTP/1.1 200 ok\r\ntraceparent: nope") == ""
    request = connect.parse_request(
        connect.encode_request(connect.ConnectRequest(KEY, 8080, "west", "x" * 300))[:-4]
    )
    assert request.traceparent == ""  # an invalid one is ignored: the trace restarts
    assert tracecontext.MAX_LENGTH < 300 + 100
