"""gRPC over HTTP/2 as bytes and headers: status codes, `grpc-message`, message framing. Pure.

Shared by the sidecar's gRPC-aware proxy (`sidecar.http2.grpc`) and the h2 gRPC client
(`mesh.grpc_h2`, `ca.h2grpc`), which is why it lives in mesh/. A message on the wire is a
5-byte prefix (a compressed flag, then a big-endian 32-bit length) followed by the message
(gRPC's doc/PROTOCOL-HTTP2.md, "Length-Prefixed-Message"). This module does not compress:
the client never asks for it (it sends no `grpc-accept-encoding`), so a compressed message
from the peer is a protocol error.
"""

from __future__ import annotations

OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

CODE_NAMES = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
]

PREFIX = 5


def code_name(code: int) -> str:
    """`UNAVAILABLE` for 14, as grpcio's `StatusCode.name` spells it."""
    return CODE_NAMES[code] if 0 <= code < len(CODE_NAMES) else f"CODE_{code}"


class FramingError(Exception):
    """A length-prefixed message stream that breaks the rules; `code` is the status to end
    the call with (RESOURCE_EXHAUSTED for an oversized message, as grpcio does)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def frame(message: bytes) -> bytes:
    """`message` with its 5-byte prefix (uncompressed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


class MessageReader:
    """Reassembles length-prefixed messages from DATA frames, refusing oversized ones before
    buffering them (the prefix says the size up front)."""

    def __init__(self, max_message: int) -> None:
        self._max = max_message
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The messages `data` completes; `FramingError` for one compressed or too large."""
        self._buffer += data
        out: list[bytes] = []
        while len(self._buffer) >= PREFIX:
            flag = self._buffer[0]
            size = int.from_bytes(self._buffer[1:PREFIX], "big")
            if flag != 0:
                raise FramingError("compressed message, none was negotiated", INTERNAL)
            if size > self._max:
                raise FramingError(
                    f"received message larger than max ({size} vs. {self._max})",
                    RESOURCE_EXHAUSTED,
                )
            if len(self._buffer) < PREFIX + size:
                break
            out.append(bytes(self._buffer[PREFIX : PREFIX + size]))
            del self._buffer[: PREFIX + size]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message (a stream must not end with any)."""
        return len(self._buffer)


_FROM_HTTP = {  # gRPC's doc/http-grpc-status-mapping.md
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}


def code_of_http(status: int) -> int:
    """The gRPC code for an HTTP status answered instead of a gRPC response."""
    return _FROM_HTTP.get(status, UNKNOWN)


def is_grpc(content_type: str | None) -> bool:
    """`application/grpc` and its `+proto`/`+json` variants (gRPC over HTTP/2, §Requests)."""
    if not content_type:
        return False
    ct = content_type.lower()
    return ct == "application/grpc" or ct.startswith(("application/grpc+", "application/grpc;"))


def parse_status(value: str | None) -> int | None:
    """A `grpc-status` header value; None if absent or not a number."""
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else None


_UNRESERVED = frozenset(range(0x20, 0x7F)) - {ord("%")}


def encode_message(text: str) -> str:
    """`grpc-message` encoding: UTF-8, percent-encoding anything outside printable ASCII and %."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in text.encode())


def decode_message(value: str) -> str:
    """The inverse of `encode_message` (malformed escapes are kept as they are, as gRPC says)."""
    out = bytearray()
    raw = value.encode("latin-1", "replace")
    i = 0
    while i < len(raw):
        if raw[i] == ord("%") and i + 2 < len(raw) and _is_hex(raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "replace")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)
