"""Codecs: round trips, and decoders that face the network never raise anything but CodecError."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import codec, connect
from mesh.errors import CodecError
from mesh.model import (
    ClusterInfo,
    ClusterWeight,
    Endpoint,
    GatewayAddress,
    MergedService,
    ServicePort,
    Snapshot,
    TrafficPolicy,
)
from mesh.naming import ServiceKey, SpiffeId

KEY = ServiceKey("demo", "echo")


def sample_snapshot() -> Snapshot:
    ep = Endpoint("west", "10.2.0.10", "echo-1", SpiffeId("west.fedgate.local", "demo", "echo"))
    return Snapshot(
        version="v1",
        clusters=(
            ClusterInfo(
                "west",
                "west.fedgate.local",
                GatewayAddress("172.30.0.11", 15443, "10.2.0.1", 15008),
                ("PEM",),
            ),
        ),
        services=(
            MergedService(
                KEY, "10.255.0.1", (ServicePort("http", 8080, "HTTP"),), ("west",), (ep,)
            ),
        ),
        policies=(TrafficPolicy(KEY, (ClusterWeight("local", 80), ClusterWeight("remote", 20))),),
        trust_bundle={"west.fedgate.local": ("PEM",)},
    )


def test_snapshot_round_trip() -> None:
    snap = sample_snapshot()
    raw = codec.dumps(codec.snapshot_to_json(snap))
    back = codec.decode(raw, codec.snapshot_from_json, "snapshot")
    assert back == snap


def test_snapshot_decode_names_the_bad_field() -> None:
    obj = codec.snapshot_to_json(sample_snapshot())
    obj["services"][0]["endpoints"][0]["identity"] = "http://not-spiffe"
    with pytest.raises(CodecError, match=r"service: endpoint: .*spiffe"):
        codec.snapshot_from_json(obj)


def test_stream_header_round_trip() -> None:
    h = codec.StreamHeader(KEY, 8080, "west", "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01")
    frame = codec.encode_header(h) + b"rest"
    parsed = codec.split_frame(frame)
    assert parsed is not None
    obj, rest = parsed
    assert codec.header_from_json(obj) == h
    assert rest == b"rest"
    assert codec.split_frame(frame[:5]) is None


def test_oversized_header_is_refused() -> None:
    with pytest.raises(CodecError, match="exceeds"):
        codec.split_frame(codec.HEADER_MAGIC + b"\xff\xff")


@given(st.binary(max_size=600))
def test_split_frame_fuzz(data: bytes) -> None:
    try:
        out = codec.split_frame(data)
        if out is not None:
            codec.header_from_json(out[0])
    except CodecError:
        pass


def test_connect_round_trip() -> None:
    req = connect.ConnectRequest(KEY, 8080, "west", "00-" + "aa" * 16 + "-" + "bb" * 8 + "-01")
    head, rest = connect.split_head(connect.encode_request(req) + b"x") or (b"", b"")
    assert rest == b"x"
    assert connect.parse_request(head) == req
    assert connect.parse_response(connect.encode_response(503, "no\r\nendpoint")) == (
        503,
        "no  endpoint",
    )


def test_a_subset_rides_the_connect_and_the_stream_header() -> None:
    labels = (("version", "v2"), ("app.kubernetes.io/tier", "gold"))
    req = connect.ConnectRequest(KEY, 8080, "west", "", labels)
    head, _ = connect.split_head(connect.encode_request(req)) or (b"", b"")
    assert b"Fedgate-Subset: app.kubernetes.io/tier=gold,version=v2" in head
    assert connect.parse_request(head).labels == tuple(sorted(labels))
    header = codec.StreamHeader(KEY, 8080, "west", "", tuple(sorted(labels)))
    out = codec.split_frame(codec.encode_header(header))
    assert out is not None
    assert codec.header_from_json(out[0]) == header


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("version", "is not key=value"),
        ("version=v 2", "not a Kubernetes label value"),
        ("-bad=v1", "not a Kubernetes label key"),
        (",".join(f"k{i}=v" for i in range(17)), "at most 16"),
    ],
)
def test_a_bad_subset_header_is_refused_by_name(value: str, why: str) -> None:
    head = (
        f"CONNECT {KEY.fqdn}:8080 HTTP/1.1\r\nFedgate-Cluster: west\r\nFedgate-Subset: {value}"
    ).encode()
    with pytest.raises(CodecError, match=why):
        connect.parse_request(head)


def test_a_refusal_can_say_the_peer_gateway_is_unreachable() -> None:
    head = connect.encode_response(502, "tunnel to west: refused", peer_unreachable=True)
    assert connect.response_peer_unreachable(head)
    assert connect.parse_response(head) == (502, "tunnel to west: refused")
    assert not connect.response_peer_unreachable(connect.encode_response(503, "no endpoint"))


def test_connect_head_is_bounded() -> None:
    with pytest.raises(CodecError, match="exceeds"):
        connect.split_head(b"CONNECT " + b"a" * connect.MAX_REQUEST)


def test_a_port_or_status_of_thousands_of_digits_is_a_codec_error() -> None:
    # Found by bench/fuzz.py: int() refuses over 4300 digits with a ValueError, which a head
    # within MAX_REQUEST can carry.
    digits = "9" * 5000
    with pytest.raises(CodecError, match="no valid port"):
        connect.parse_request(f"CONNECT echo.demo.svc.clusterset.local:{digits} HTTP/1.1".encode())
    with pytest.raises(CodecError, match="malformed CONNECT response"):
        connect.parse_response(f"HTTP/1.1 {digits} OK".encode())


@given(st.binary(max_size=300))
def test_connect_parse_fuzz(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        connect.parse_request(data)
