"""HTTP/2 requests and responses as the policy sees them, and the answers the sidecar makes. Pure.

A request is its pseudo-headers plus the rest: `:path` is what route matching calls the path
(for gRPC, `/package.Service/Method`), `:authority` is matched as `host` (HTTP/1.1's name for
it) and sent upstream as it came, with `-shadow` appended for a mirror. The sidecar's own
answers carry `x-fedgate-reason`; to a gRPC client they are Trailers-Only responses (HTTP 200,
`grpc-status`, `grpc-message` = "<reason>: <detail>"), so grpcio reports the code and reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sidecar.http2 import grpc
from sidecar.http2.session import Fields
from sidecar.traffic.match import RequestInfo

REASON_HEADER = "x-fedgate-reason"


class MessageError(Exception):
    """A request the sidecar cannot route (missing or malformed pseudo-headers)."""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    scheme: str
    authority: str
    path: str
    headers: Fields  # without pseudo-headers, names lower-case (HTTP/2 requires it)

    @property
    def grpc(self) -> bool:
        return grpc.is_grpc(self.get("content-type"))

    def get(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def info(self) -> RequestInfo:
        """What route matching looks at (`:authority` as `host`)."""
        extra = (("host", self.authority),) if self.authority else ()
        return RequestInfo.build(self.method, self.path, self.headers + extra)

    def fields(self, traceparent: str = "") -> Fields:
        """The header block to send upstream. `traceparent`: replaces the app's (W3C Trace
        Context: each hop sends its own span)."""
        pseudo = [(":method", self.method), (":scheme", self.scheme)]
        if self.authority:
            pseudo.append((":authority", self.authority))
        pseudo.append((":path", self.path))
        if not traceparent:
            return (*pseudo, *self.headers)
        rest = [(k, v) for k, v in self.headers if k != "traceparent"]
        return (*pseudo, *rest, ("traceparent", traceparent))

    def shadow(self) -> Request:
        """A mirror's copy: `-shadow` appended to the authority's host (Envoy's convention)."""
        host, colon, port = self.authority.rpartition(":")
        if not colon or not port.isdigit():
            host, colon, port = self.authority, "", ""
        return replace(self, authority=f"{host}-shadow{colon}{port}")


def parse_request(fields: Fields) -> Request:
    """The request a HEADERS block opens; MessageError names what is missing or wrong."""
    pseudo: dict[str, str] = {}
    headers: list[tuple[str, str]] = []
    for name, value in fields:
        if name.startswith(":"):
            pseudo[name] = value
        else:
            headers.append((name.lower(), value))
    method = pseudo.get(":method", "")
    if not method:
        raise MessageError("no :method pseudo-header")
    if method == "CONNECT":
        raise MessageError("CONNECT to a mesh service is not supported")
    path = pseudo.get(":path", "")
    if not path.startswith("/") and path != "*":
        raise MessageError(f":path {path!r} is not an absolute path")
    authority = pseudo.get(":authority") or next((v for k, v in headers if k == "host"), "")
    headers = [(k, v) for k, v in headers if k != "host"]
    return Request(method, pseudo.get(":scheme", "http"), authority, path, tuple(headers))


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    fields: Fields  # as received, pseudo-header included: forwarded unchanged
    end: bool  # the HEADERS ended the stream (no body; for gRPC, Trailers-Only)

    @property
    def grpc_status(self) -> int | None:
        """`grpc-status` of a Trailers-Only answer (in the headers); None otherwise."""
        value = next((v for k, v in self.fields if k == "grpc-status"), None)
        return grpc.parse_status(value)


def parse_response(fields: Fields, end: bool) -> Response:
    raw = next((v for k, v in fields if k == ":status"), "")
    if not raw.isdigit():
        raise MessageError(f"response :status {raw!r} is not a status code")
    return Response(int(raw), fields, end)


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    fields: Fields
    body: bytes


def local_answer(status: int, reason: str, detail: str, for_grpc: bool) -> LocalAnswer:
    """The sidecar's own response: HTTP `status` with a text body, or for gRPC a
    Trailers-Only response whose code `grpc.code_for` picks."""
    if for_grpc:
        code = grpc.code_for(status, reason)
        return LocalAnswer(
            (
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("grpc-status", str(code)),
                ("grpc-message", grpc.encode_message(f"{reason}: {detail}")),
                (REASON_HEADER, reason),
            ),
            b"",
        )
    body = f"{reason}: {detail}\n".encode()
    return LocalAnswer(
        (
            (":status", str(status)),
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(body))),
            (REASON_HEADER, reason),
        ),
        body,
    )


def failure_trailers(reason: str, detail: str) -> Fields:
    """Trailers ending a gRPC response whose headers already went out (e.g. a timeout while
    the response streams): the call fails with a status instead of a bare reset."""
    code = grpc.code_for(0, reason)
    return (
        ("grpc-status", str(code)),
        ("grpc-message", grpc.encode_message(f"{reason}: {detail}")),
    )
