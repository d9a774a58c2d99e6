"""gRPC status codes and the mapping between them and HTTP statuses. Pure.

The sidecar answers a gRPC client's failed call as gRPC does (HTTP 200 with `grpc-status` and
`grpc-message`, a Trailers-Only response) so the client library reports a status code and the
reason instead of a protocol error. Which code: a timeout is DEADLINE_EXCEEDED, the sidecar's own
refusals and upstream failures are UNAVAILABLE (the code clients treat as "try again"), and an
HTTP status (e.g. a fault abort's `httpStatus`) maps as in gRPC's
doc/http-grpc-status-mapping.md. The reverse map (`http_status_of`) is Envoy's, used to judge a
gRPC answer for outlier detection (UNAVAILABLE counts as a 503).
"""

from __future__ import annotations

OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16
PERMISSION_DENIED = 7

_FROM_HTTP = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}

# Envoy's Grpc::Utility::grpcToHttpStatus.
_TO_HTTP = {
    0: 200,
    1: 499,
    2: 500,
    3: 400,
    4: 504,
    5: 404,
    6: 409,
    7: 403,
    8: 429,
    9: 400,
    10: 409,
    11: 400,
    12: 501,
    13: 500,
    14: 503,
    15: 500,
    16: 401,
}

# Reasons the sidecar answers with, and the code each one is for a gRPC client.
_FROM_REASON = {
    "upstream timeout": DEADLINE_EXCEEDED,
    "max requests": UNAVAILABLE,
    "pending overflow": UNAVAILABLE,
    "no route": UNAVAILABLE,
    "not ready": UNAVAILABLE,
    "upstream connect failure": UNAVAILABLE,
    "upstream reset": UNAVAILABLE,
    "bad upstream response": UNAVAILABLE,
}


def is_grpc(content_type: str | None) -> bool:
    """`application/grpc` and its `+proto`/`+json` variants (gRPC over HTTP/2, §Requests)."""
    if not content_type:
        return False
    ct = content_type.lower()
    return ct == "application/grpc" or ct.startswith(("application/grpc+", "application/grpc;"))


def code_for(status: int, reason: str) -> int:
    """The gRPC code for a failure the sidecar answers itself (`reason` wins over `status`)."""
    code = _FROM_REASON.get(reason)
    if code is not None:
        return code
    return _FROM_HTTP.get(status, UNKNOWN)


def http_status_of(grpc_status: int) -> int:
    """What a gRPC status counts as in HTTP terms (unknown codes: 500)."""
    return _TO_HTTP.get(grpc_status, 500)


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
