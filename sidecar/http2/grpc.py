"""gRPC status codes and the mapping between them and HTTP statuses. Pure.

The sidecar answers a gRPC client's failed call as gRPC does (HTTP 200 with `grpc-status` and
`grpc-message`, a Trailers-Only response) so the client library reports a status code and the
reason instead of a protocol error. Which code: a timeout is DEADLINE_EXCEEDED, the sidecar's own
refusals and upstream failures are UNAVAILABLE (the code clients treat as "try again"), and an
HTTP status (e.g. a fault abort's `httpStatus`) maps as in gRPC's
doc/http-grpc-status-mapping.md. The reverse map (`http_status_of`) is Envoy's, used to judge a
gRPC answer for outlier detection (UNAVAILABLE counts as a 503). The codes, the HTTP-to-gRPC
map and the `grpc-message` codec live in `mesh.grpcwire`, shared with the h2 gRPC client.
"""

from __future__ import annotations

from mesh.grpcwire import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    OK,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    UNAUTHENTICATED,
    UNAVAILABLE,
    UNIMPLEMENTED,
    UNKNOWN,
    code_of_http,
    decode_message,
    encode_message,
    is_grpc,
    parse_status,
)

__all__ = [
    "CANCELLED",
    "DEADLINE_EXCEEDED",
    "INTERNAL",
    "OK",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "UNIMPLEMENTED",
    "UNKNOWN",
    "code_for",
    "decode_message",
    "encode_message",
    "http_status_of",
    "is_grpc",
    "parse_status",
]

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


def code_for(status: int, reason: str) -> int:
    """The gRPC code for a failure the sidecar answers itself (`reason` wins over `status`)."""
    code = _FROM_REASON.get(reason)
    if code is not None:
        return code
    return code_of_http(status)


def http_status_of(grpc_status: int) -> int:
    """What a gRPC status counts as in HTTP terms (unknown codes: 500)."""
    return _TO_HTTP.get(grpc_status, 500)
