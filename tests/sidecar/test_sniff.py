"""Protocol sniffing (`sidecar.sniff`): declared protocols and first bytes, no sockets."""

from __future__ import annotations

import pytest

from sidecar.sniff import (
    H2,
    HTTP1,
    OPAQUE,
    PREFACE,
    declared,
    first_bytes,
    sniff_http1,
    sniff_preface,
    verdict,
)


def test_preface_sniffing() -> None:
    assert sniff_preface(PREFACE + b"\x00\x00") is True
    assert sniff_preface(b"PRI * HT") is None
    assert sniff_preface(b"") is None
    assert sniff_preface(b"GET / HTTP/1.1\r\n") is False


def test_http1_sniffing() -> None:
    assert sniff_http1(b"GET / HTTP/1.1\r\n") is True
    assert sniff_http1(b"PO") is None
    assert sniff_http1(b"*3\r\n$3\r\nSET") is False
    assert sniff_http1(b"PRI * HTTP/2.0") is False
    assert sniff_http1(b"\x16\x03\x01") is False
    assert sniff_http1(b"") is None


@pytest.mark.parametrize(
    ("protocol", "sniffing", "mode"),
    [
        ("HTTP", True, HTTP1),
        ("HTTP", False, HTTP1),
        ("HTTP2", True, H2),
        ("GRPC", False, H2),
        ("TCP", True, None),  # left to the first bytes
        ("TCP", False, OPAQUE),  # sniffing off: per connection
        ("TLS", True, OPAQUE),  # anything else is never sniffed
        ("MONGO", True, OPAQUE),
    ],
)
def test_a_declared_protocol_decides_before_any_byte(
    protocol: str, sniffing: bool, mode: str | None
) -> None:
    assert declared(protocol, sniffing) == mode


@pytest.mark.parametrize(
    ("first", "mode"),
    [
        (b"GET /healthz HTTP/1.1\r\n", HTTP1),
        (b"DELETE ", HTTP1),
        (PREFACE, H2),
        (PREFACE[:20], None),  # the preface so far: wait for more
        (b"P", None),  # POST, PUT, PATCH or the preface: wait for more
        (b"PU", None),
        (b"PR", None),
        (b"\x16\x03\x01\x02\x00", OPAQUE),  # a TLS ClientHello
        (b"*1\r\n$4\r\nPING\r\n", OPAQUE),  # Redis
        (b"CONNECT example:443 HTTP/1.1\r\n", OPAQUE),  # not a request we route
        (b"get / HTTP/1.1\r\n", OPAQUE),  # methods are case-sensitive (RFC 9110 §9.1)
    ],
)
def test_the_first_bytes_decide_or_ask_for_more(first: bytes, mode: str | None) -> None:
    assert verdict(first) == mode


def test_as_a_frame_parser_the_bytes_stay_buffered() -> None:
    # Conn.read_frame keeps what the parser hands back: every byte, for the mode that serves.
    assert first_bytes(b"GET / HTTP/1.1\r\n") == (HTTP1, b"GET / HTTP/1.1\r\n")
    assert first_bytes(PREFACE + b"\x00\x00\x12") == (H2, PREFACE + b"\x00\x00\x12")
    assert first_bytes(b"GE") is None
    assert first_bytes(b"SSH-2.0-OpenSSH_9.6\r\n") == (OPAQUE, b"SSH-2.0-OpenSSH_9.6\r\n")
