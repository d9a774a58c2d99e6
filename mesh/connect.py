"""HTTP/1.1 CONNECT for the local hop, sidecar -> its cluster's gateway (egress).

The request names the target as `<svc>.<ns>.svc.clusterset.local:<port>` and the destination
cluster in `Fedgate-Cluster` (as Istio's HBONE names its target in the CONNECT authority), plus
W3C `traceparent`, plus `Fedgate-Subset: key=value,...` when the call is for a subset: the
remote ingress then picks an endpoint carrying those labels (a remote cluster whose endpoints
run mixed versions can still serve a subset). After `200` the connection carries the inner TLS
bytes opaquely.
Parsing is bounded (RFC 9112 leaves limits to us: `MAX_REQUEST`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh import tracecontext
from mesh.errors import CodecError, MeshError
from mesh.naming import ServiceKey

MAX_REQUEST = 8192
CLUSTER_HEADER = "fedgate-cluster"
SUBSET_HEADER = "fedgate-subset"
PEER_HEALTH_HEADER = "fedgate-peer-health"
UNREACHABLE = "unreachable"
MAX_LABELS = 16
# Kubernetes label keys (optional DNS prefix) and values, without the length rules.
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")

Labels = tuple[tuple[str, str], ...]


def check_labels(labels: Labels) -> Labels:
    """`labels` sorted, or CodecError naming the bad pair (what a subset selects by)."""
    if len(labels) > MAX_LABELS:
        raise CodecError(f"{len(labels)} subset labels, at most {MAX_LABELS}")
    for key, value in labels:
        if not _LABEL_KEY.match(key) or len(key) > 253:
            raise CodecError(f"subset label key {key[:80]!r} is not a Kubernetes label key")
        if not _LABEL_VALUE.match(value) or len(value) > 63:
            raise CodecError(f"subset label {key}={value[:80]!r}: not a Kubernetes label value")
    return tuple(sorted(labels))


def format_labels(labels: Labels) -> str:
    return ",".join(f"{k}={v}" for k, v in labels)


def parse_labels(text: str) -> Labels:
    pairs: list[tuple[str, str]] = []
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise CodecError(f"subset label {item[:80]!r} is not key=value")
        pairs.append((key, value))
    return check_labels(tuple(pairs))


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    service: ServiceKey
    port: int
    cluster: str
    traceparent: str = ""
    labels: Labels = ()  # the subset's labels: the remote ingress picks among those endpoints


def encode_request(r: ConnectRequest) -> bytes:
    authority = f"{r.service.fqdn}:{r.port}"
    lines = [
        f"CONNECT {authority} HTTP/1.1",
        f"Host: {authority}",
        f"Fedgate-Cluster: {r.cluster}",
    ]
    if r.traceparent:
        lines.append(f"traceparent: {r.traceparent}")
    if r.labels:
        lines.append(f"Fedgate-Subset: {format_labels(check_labels(r.labels))}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def split_head(buf: bytes) -> tuple[bytes, bytes] | None:
    """(head, rest) once the blank line arrived; None if more is needed; error if too long."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_REQUEST:
            raise CodecError(f"CONNECT head exceeds {MAX_REQUEST} bytes")
        return None
    if end + 4 > MAX_REQUEST:
        raise CodecError(f"CONNECT head exceeds {MAX_REQUEST} bytes")
    return buf[:end], buf[end + 4 :]


def parse_request(head: bytes) -> ConnectRequest:
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError as e:
        raise CodecError("CONNECT head is not ASCII") from e
    request_line, *header_lines = text.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or parts[0] != "CONNECT" or parts[2] != "HTTP/1.1":
        raise CodecError(f"malformed CONNECT request line {request_line[:80]!r}")
    host, sep, port_text = parts[1].rpartition(":")
    # At most 5 digits before int(): Python refuses to convert over 4300 (a ValueError).
    if not sep or not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
        raise CodecError(f"CONNECT authority {parts[1][:80]!r} has no valid port")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise CodecError(f"malformed header line {line[:80]!r}")
        headers[name.lower()] = value.strip()
    cluster = headers.get(CLUSTER_HEADER, "")
    if not cluster:
        raise CodecError("CONNECT has no Fedgate-Cluster header")
    try:
        service = ServiceKey.parse_fqdn(host)
    except MeshError as e:
        raise CodecError(f"CONNECT target: {e}") from e
    traceparent = headers.get("traceparent", "")
    if tracecontext.parse(traceparent) is None:
        traceparent = ""  # invalid: ignored, the trace restarts (W3C Trace Context 3.2.2)
    subset = headers.get(SUBSET_HEADER, "")
    return ConnectRequest(
        service, int(port_text), cluster, traceparent, parse_labels(subset) if subset else ()
    )


def encode_response(
    status: int, reason: str, traceparent: str = "", *, peer_unreachable: bool = False
) -> bytes:
    """The egress's answer. `traceparent` (on 200): the span nearest the destination that the
    tunnel set up, so the caller parents the destination sidecar's span on it.
    `peer_unreachable` (on a refusal): the tunnel to the peer cluster's gateway could not be
    opened, so the caller may avoid that cluster for a while (`Fedgate-Peer-Health`)."""
    # The reason phrase carries our explanation (no silent 503s); keep it one clean line.
    clean = "".join(ch if 32 <= ord(ch) < 127 else " " for ch in reason)[:200]
    extra = f"traceparent: {traceparent}\r\n" if tracecontext.parse(traceparent) else ""
    if peer_unreachable:
        extra += f"Fedgate-Peer-Health: {UNREACHABLE}\r\n"
    return f"HTTP/1.1 {status} {clean}\r\n{extra}\r\n".encode("ascii")


def parse_response(head: bytes) -> tuple[int, str]:
    line = head.split(b"\r\n", 1)[0].decode("ascii", "replace")
    parts = line.split(" ", 2)
    if len(parts) < 2 or parts[0] != "HTTP/1.1" or len(parts[1]) != 3 or not parts[1].isdigit():
        raise CodecError(f"malformed CONNECT response {line[:80]!r}")
    return int(parts[1]), parts[2] if len(parts) > 2 else ""


def _response_header(head: bytes, name: bytes) -> str:
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip().decode("ascii", "replace")
    return ""


def response_traceparent(head: bytes) -> str:
    """The valid `traceparent` of a CONNECT response head, else "" (ignored, never fatal)."""
    text = _response_header(head, b"traceparent")
    return text if tracecontext.parse(text) is not None else ""


def response_peer_unreachable(head: bytes) -> bool:
    """Whether a CONNECT refusal says the peer cluster's gateway is unreachable."""
    return _response_header(head, PEER_HEALTH_HEADER.encode()).lower() == UNREACHABLE
