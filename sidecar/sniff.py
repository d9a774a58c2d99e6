"""Which protocol a connection speaks: the sidecar's protocol sniffing, as pure functions.

The source sidecar serves a captured app connection in one of three modes: `HTTP1` (each
HTTP/1.1 request routed on its own, `sidecar.http.proxy`), `H2` (each HTTP/2 stream routed on
its own, `sidecar.http2.proxy`) or `OPAQUE` (per TCP connection, `sidecar.outbound`).

1. The service port's declared protocol decides first (`declared`): `HTTP` -> `HTTP1`,
   `HTTP2`/`GRPC` -> `H2` (prior knowledge: the client speaks first, with the preface), any
   other -> `OPAQUE`. Only a `TCP` port with sniffing on is left to its first bytes (None).
2. The first bytes decide (`verdict`), as Istio's sniffing: a common HTTP/1.x method and a
   space -> `HTTP1`; the HTTP/2 client preface -> `H2`; anything else -> `OPAQUE`; None while
   too few bytes have arrived to tell.

No I/O and no clock: the driver (`HttpProxy.wants` for the source, `sidecar.inbound_gate` for
the destination) reads the bytes, keeps them buffered for whichever mode serves the connection,
and stops waiting after its timeout (then: `OPAQUE`). This module imports nothing of the
sidecar's, so both `sidecar.http` and `sidecar.http2` may use it without depending on each other.
"""

from __future__ import annotations

HTTP1 = "http1"
H2 = "h2"
OPAQUE = ""  # per connection (opaque TCP)

SNIFF_TIMEOUT = 0.1  # how long a driver waits for a TCP port's first bytes

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_METHODS = (
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
)


def declared(protocol: str, sniffing: bool) -> str | None:
    """The mode a service port's declared protocol fixes; None: sniff its first bytes."""
    if protocol == "HTTP":
        return HTTP1
    if protocol in ("HTTP2", "GRPC"):
        return H2
    if protocol == "TCP" and sniffing:
        return None
    return OPAQUE


def sniff_preface(buf: bytes) -> bool | None:
    """Whether a connection's first bytes are the HTTP/2 client preface (None: too few)."""
    if buf.startswith(PREFACE):
        return True
    if PREFACE.startswith(buf):
        return None
    return False


def sniff_http1(buf: bytes) -> bool | None:
    """Whether the first bytes of a connection start an HTTP/1.x request (None: too few
    bytes to tell). Only common methods count, as Istio's sniffing; CONNECT and the HTTP/2
    preface (`PRI * HTTP/2.0`) are not HTTP/1.1 requests to route."""
    undecided = False
    for m in _METHODS:
        if buf.startswith(m):
            return True
        if len(buf) < len(m) and m.startswith(buf):
            undecided = True
    return None if undecided else False


def verdict(buf: bytes) -> str | None:
    """The mode a connection's first bytes call for; None: too few bytes to tell yet."""
    h2, h1 = sniff_preface(buf), sniff_http1(buf)
    if h2:
        return H2
    if h1:
        return HTTP1
    return None if h2 is None or h1 is None else OPAQUE


def first_bytes(buf: bytes) -> tuple[str, bytes] | None:
    """`verdict` as a `Conn.read_frame` parser: the bytes stay buffered for the chosen mode."""
    mode = verdict(buf)
    return None if mode is None else (mode, buf)
