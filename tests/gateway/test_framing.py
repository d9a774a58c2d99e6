"""Pure parts: stream header framing, the ingress header gate, routing decisions, CONNECT
targets. Hypothesis fuzzes every decoder a peer can reach: garbage never raises out of it."""

from __future__ import annotations

import contextlib
import json
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.egress import Egress
from gateway.errors import CallRefusedError
from gateway.framing import (
    FrameReader,
    HeaderAccepted,
    HeaderGate,
    HeaderRefused,
    read_reply,
)
from gateway.ingress import Ingress
from gateway.pool import PeerPool
from mesh.codec import (
    MAX_HEADER,
    StreamHeader,
    StreamReply,
    encode_header,
    encode_reply,
)
from mesh.connect import ConnectRequest
from mesh.errors import CodecError
from mesh.model import (
    ClusterInfo,
    Endpoint,
    GatewayAddress,
    MergedService,
    ServicePort,
    Snapshot,
)
from mesh.naming import ServiceKey, SpiffeId

ECHO = ServiceKey("demo", "echo")
HEADER = StreamHeader(ECHO, 7000, "west", "00-" + "a" * 32 + "-" + "b" * 16 + "-01")

SNAPSHOT = Snapshot(
    version="v1",
    clusters=(
        ClusterInfo("east", "east.fedgate.local", GatewayAddress("10.0.0.1", 1, "10.0.0.1", 2), ()),
        ClusterInfo("west", "west.fedgate.local", GatewayAddress("10.0.0.2", 3, "10.0.0.2", 4), ()),
        ClusterInfo("south", "south.fedgate.local", None, ()),
    ),
    services=(
        MergedService(
            key=ECHO,
            vip="240.0.0.10",
            ports=(ServicePort("tcp", 7000),),
            clusters=("east", "west"),
            endpoints=(
                Endpoint(
                    "west",
                    "10.2.0.1",
                    "echo-1",
                    SpiffeId("west.fedgate.local", "demo", "e"),
                    (("version", "v1"),),
                ),
                Endpoint(
                    "west",
                    "10.2.0.2",
                    "echo-2",
                    SpiffeId("west.fedgate.local", "demo", "e"),
                    (("version", "v2"),),
                ),
                Endpoint("east", "10.1.0.1", "echo-3", SpiffeId("east.fedgate.local", "demo", "e")),
            ),
        ),
    ),
)


def test_header_split_at_every_byte_boundary() -> None:
    wire = encode_header(HEADER) + b"payload"
    for cut in range(len(wire) + 1):
        gate = HeaderGate()
        first = gate.feed(wire[:cut])
        outcome = first if first is not None else gate.feed(wire[cut:])
        assert isinstance(outcome, HeaderAccepted), cut
        assert outcome.header == HEADER
        # Once the gate decided, later bytes go straight to the stream: none is lost.
        after = wire[cut:] if first is not None else b""
        assert outcome.rest + after == b"payload"


def test_reply_roundtrip_and_rest() -> None:
    wire = encode_reply(StreamReply(503, "no healthy endpoint")) + b"early"
    got = read_reply(FrameReader(), wire)
    assert got == (StreamReply(503, "no healthy endpoint"), b"early")


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (b"GET / HTTP/1.1\r\n", "magic"),
        (b"FGH1" + struct.pack("!H", MAX_HEADER + 1), "exceeds"),
        (b"FGH1\x00\x03abc", "not valid JSON"),
        (b"FGH1\x00\x02[]", "JSON object"),
        (b"FGH1\x00\x02{}", "missing field"),
    ],
)
def test_malformed_headers_are_refused_with_400(wire: bytes, why: str) -> None:
    outcome = HeaderGate().feed(wire)
    assert isinstance(outcome, HeaderRefused)
    assert outcome.status == 400
    assert why in outcome.reason


def test_end_before_header_is_refused() -> None:
    gate = HeaderGate()
    assert gate.feed(encode_header(HEADER)[:5]) is None
    assert gate.eof() == HeaderRefused(400, "stream ended before its header")


def test_malformed_reply_raises_codec_error() -> None:
    with pytest.raises(CodecError):
        read_reply(FrameReader(), b"FGH1\x00\x0f" + b'{"status":"x"} ')


def _ingress() -> Ingress:
    return Ingress("west", lambda: SNAPSHOT, inbound_port=15006, rng=random.Random(1))


def test_ingress_routes_to_a_local_endpoint_only() -> None:
    ingress = _ingress()
    chosen = {ingress.route(HEADER).address for _ in range(50)}
    assert chosen == {"10.2.0.1", "10.2.0.2"}


def test_ingress_picks_within_the_subset_the_header_names() -> None:
    ingress = _ingress()
    v2 = StreamHeader(ECHO, 7000, "west", "", (("version", "v2"),))
    assert {ingress.route(v2).address for _ in range(50)} == {"10.2.0.2"}


@pytest.mark.parametrize(
    ("header", "status", "reason"),
    [
        (
            StreamHeader(ECHO, 7000, "west", "", (("version", "v3"),)),
            503,
            "no healthy endpoint for echo.demo with labels version=v3",
        ),
        (StreamHeader(ServiceKey("demo", "nope"), 7000, "west"), 503, "unknown service nope.demo"),
        (StreamHeader(ECHO, 7001, "west"), 503, "echo.demo has no port 7001"),
        (StreamHeader(ECHO, 7000, "east"), 421, "stream for cluster east reached this gateway"),
    ],
)
def test_ingress_refusals_name_the_cause(header: StreamHeader, status: int, reason: str) -> None:
    with pytest.raises(CallRefusedError) as e:
        _ingress().route(header)
    assert (e.value.status, e.value.reason) == (status, reason)


def test_ingress_without_local_endpoint_names_the_service() -> None:
    south = Ingress("south", lambda: SNAPSHOT, inbound_port=15006)
    with pytest.raises(CallRefusedError) as e:
        south.route(StreamHeader(ECHO, 7000, "south"))
    assert (e.value.status, e.value.reason) == (503, "no healthy endpoint for echo.demo")


async def _never(_: object) -> object:
    raise AssertionError("no connection expected")


@pytest.mark.parametrize(
    ("cluster", "status", "reason"),
    [
        ("north", 503, "unknown cluster north"),
        ("south", 503, "cluster south has no gateway"),
        ("east", 400, "cluster east is local; call the endpoint directly"),
    ],
)
def test_egress_targets(cluster: str, status: int, reason: str) -> None:
    egress = Egress("east", lambda: SNAPSHOT, {"quic": PeerPool(_never)}, reply_timeout=1.0)
    with pytest.raises(CallRefusedError) as e:
        egress.target(ConnectRequest(ECHO, 7000, cluster))
    assert (e.value.status, e.value.reason) == (status, reason)
    target = egress.target(ConnectRequest(ECHO, 7000, "west"))
    assert (target.host, target.port, target.trust_domain) == ("10.0.0.2", 3, "west.fedgate.local")


# --- fuzzing ----------------------------------------------------------------------------------


def _ingress_step(chunks: list[bytes]) -> None:
    """The ingress header path as the tunnel drives it: gate, then route. Never raises
    anything but a CallRefusedError (which the handler turns into a reply)."""
    gate = HeaderGate()
    ingress = _ingress()
    for chunk in chunks:
        outcome = gate.feed(chunk)
        if outcome is None:
            continue
        if isinstance(outcome, HeaderAccepted):
            try:
                ingress.route(outcome.header)
            except CallRefusedError as e:
                status = e.status
                assert status in (421, 503)
        else:
            assert outcome.status == 400
        return
    assert isinstance(gate.eof(), HeaderRefused)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_fuzz_garbage_bytes(chunks: list[bytes]) -> None:
    _ingress_step(chunks)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["ns", "svc", "port", "cluster", "traceparent", "x"]),
        json_values | st.sampled_from(["demo", "echo", "west", 7000, "Echo", "a.b", -1, 70000]),
        max_size=6,
    ),
    st.integers(min_value=1, max_value=20),
)
def test_fuzz_well_framed_json(obj: dict[str, object], cut: int) -> None:
    body = json.dumps(obj).encode()
    wire = b"FGH1" + struct.pack("!H", len(body)) + body
    _ingress_step([wire[:cut], wire[cut:]])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=12), st.integers(min_value=0, max_value=0xFFFF), st.binary(max_size=64))
def test_fuzz_reply_reader_only_raises_codec_error(prefix: bytes, length: int, body: bytes) -> None:
    wire = b"FGH1" + struct.pack("!H", length) + body
    for data in (prefix, wire):
        with contextlib.suppress(CodecError):
            read_reply(FrameReader(), data)
