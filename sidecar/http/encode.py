"""HTTP/1.1 heads for the next hop, and the sidecar's own responses. Pure.

Hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and those it names, `Keep-Alive`,
`Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`) are dropped and the framing
is the proxy's own (`Content-Length` or `chunked`). Requests go upstream as HTTP/1.1 on a
persistent connection whatever the app spoke.
"""

from __future__ import annotations

from sidecar.http.codec import Framing, Headers, Request, Response, tokens

HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    )
)


def forwardable(headers: Headers, *, upgrade: bool = False) -> list[tuple[str, str]]:
    """`headers` without hop-by-hop ones, those named in `Connection`, and the framing
    (`Content-Length` is re-derived); with `upgrade`, `Upgrade` is kept for the next hop."""
    named = set(tokens(headers, "connection"))
    out = []
    for k, v in headers:
        low = k.lower()
        dropped = low in HOP_BY_HOP or low in named or low == "content-length"
        if dropped and not (upgrade and low == "upgrade"):
            continue
        out.append((k, v))
    return out


def _framing_headers(framing: Framing, declared_length: bool) -> list[tuple[str, str]]:
    if framing.kind == "chunked":
        return [("Transfer-Encoding", "chunked")]
    if framing.kind == "length" and (framing.length or declared_length):
        return [("Content-Length", str(framing.length))]
    return []


def _head(first: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [first, *(f"{k}: {v}" for k, v in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def encode_request(req: Request, framing: Framing, traceparent: str = "") -> bytes:
    """The head to send upstream: always HTTP/1.1, persistent, with the proxy's framing.
    `traceparent`: replaces the app's (W3C Trace Context: each hop sends its own span)."""
    headers = forwardable(req.headers, upgrade=req.upgrade)
    if traceparent:
        headers = [(k, v) for k, v in headers if k.lower() != "traceparent"]
        headers.append(("traceparent", traceparent))
    if req.upgrade:
        headers.append(("Connection", "upgrade"))
    declared = req.get("content-length") is not None
    headers += _framing_headers(framing, declared)
    return _head(f"{req.method} {req.target} HTTP/1.1", headers)


def encode_response(
    resp: Response,
    framing: Framing,
    *,
    close: bool = False,
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """The head to send to the app. For a body-less response (HEAD, 204, 304) the upstream's
    `Content-Length` is kept: it describes the representation, not this message."""
    upgrade = resp.status == 101
    headers = forwardable(resp.headers, upgrade=upgrade)
    if framing.kind == "none":
        headers += [(k, v) for k, v in resp.headers if k.lower() == "content-length"]
    else:
        headers += _framing_headers(framing, True)
    if upgrade:
        headers.append(("Connection", "upgrade"))
    elif close:
        headers.append(("Connection", "close"))
    headers += extra
    reason = resp.reason or "-"
    return _head(f"HTTP/1.1 {resp.status} {reason}", headers)


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


LAST_CHUNK = b"0\r\n\r\n"

REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


def local_response(status: int, reason: str, detail: str, *, close: bool = False) -> bytes:
    """A response the sidecar makes itself: the reason in `x-fedgate-reason` and the body."""
    body = f"{status} {reason}: {detail}\n".encode("utf-8", "replace")
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("x-fedgate-reason", _header_safe(reason)),
    ]
    if close:
        headers.append(("Connection", "close"))
    return _head(f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", headers) + body


def _header_safe(text: str) -> str:
    return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text)
