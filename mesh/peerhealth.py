"""Peer-gateway health, from a cluster's gateway to its own sidecars: the wire format. Pure.

A sidecar asks its local gateway's egress port (the port it CONNECTs to) with
`GET /fedgate/v1/peer-health HTTP/1.1`; the gateway answers `200` with an unbounded body of
newline-delimited JSON reports (the connection's end ends the body, as HTTP/1.1 allows without
a length), one at once and one at every change of what its probes found, plus one every
`HEARTBEAT` seconds so a silent gateway is noticed:

    {"unreachable": ["west"], "seq": 7}

`unreachable` lists the peer clusters whose gateway the local gateway's health probes or dials
found down (gateway.pool); every other cluster is healthy or not yet dialled. It is the
gateway's view, pushed, as Envoy's health-checked hosts are excluded from load balancing: a
sidecar avoids those clusters while they are listed and takes them back when they are not
(sidecar.traffic.peers), so re-admission is decided by the gateway's probes, never by a call.

Decoding is bounded and strict: a report that does not decode ends the watch (the sidecar
reconnects); it never reaches routing.
"""

from __future__ import annotations

import json

from mesh.errors import CodecError, MeshError
from mesh.naming import check_label

PATH = "/fedgate/v1/peer-health"
REQUEST = f"GET {PATH} HTTP/1.1\r\nHost: fedgate-egress\r\n\r\n".encode("ascii")
RESPONSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-store\r\n\r\n"
)
HEARTBEAT = 5.0  # seconds between reports when nothing changes
MAX_REPORT = 64 * 1024  # bytes of one report line
MAX_CLUSTERS = 1000


def is_request(head: bytes) -> bool:
    """Whether a request head (without the blank line) asks for peer health."""
    line = head.split(b"\r\n", 1)[0]
    return line == f"GET {PATH} HTTP/1.1".encode("ascii")


def encode_report(unreachable: frozenset[str], seq: int) -> bytes:
    return json.dumps({"unreachable": sorted(unreachable), "seq": seq}).encode() + b"\n"


def decode_report(line: bytes) -> frozenset[str]:
    """The unreachable clusters of one report line, or CodecError."""
    if len(line) > MAX_REPORT:
        raise CodecError(f"peer-health report of {len(line)} bytes, at most {MAX_REPORT}")
    try:
        value = json.loads(line)
    except ValueError as e:
        raise CodecError(f"peer-health report is not JSON: {e}") from e
    names = value.get("unreachable") if isinstance(value, dict) else None
    if not isinstance(names, list) or len(names) > MAX_CLUSTERS:
        raise CodecError("peer-health report has no list of unreachable clusters")
    if not all(isinstance(n, str) for n in names):
        raise CodecError("peer-health report lists a cluster that is not a string")
    try:
        return frozenset(check_label(n, "cluster name") for n in names)
    except MeshError as e:
        raise CodecError(f"peer-health report: {e}") from e
