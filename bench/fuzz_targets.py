"""The network-facing decoders bench/fuzz.py drives: each a function of one input's bytes, the
error types it promises (anything else is a crash), and valid encodings to mutate from.

A target feeds its input the way the driver would (split at an arbitrary point where the
decoder is incremental) and goes one step past decoding where the next step also reads peer
bytes (the FGH1 object into a StreamHeader, a DNS query into its answer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from clusters.rig import config_repo
from federation.gitops.load import SourceFile
from federation.gitops.validate import validate_files
from mesh import codec, connect, mux
from mesh.errors import CodecError
from mesh.naming import ServiceKey
from sidecar.dns import (
    TYPE_A,
    Header,
    Message,
    Question,
    encode_message,
    respond,
)
from sidecar.errors import DnsFormatError
from sidecar.http import codec as http

_SVC = ServiceKey("demo", "echo")
_TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], str | None]  # an outcome worth counting that is not an exception
    expected: tuple[type[BaseException], ...]  # the decoder's documented error types
    seeds: tuple[bytes, ...]
    tokens: tuple[bytes, ...] = ()  # fragments worth splicing in (a dictionary, as libFuzzer's)


def _split(data: bytes) -> tuple[bytes, bytes]:
    # The first byte picks where the input is cut into two reads.
    if not data:
        return b"", b""
    cut = data[0] % (len(data)) if len(data) > 1 else 1
    return data[1 : cut + 1], data[cut + 1 :]


# --- CONNECT (mesh/connect.py) ------------------------------------------------------------------


def run_connect(data: bytes) -> str | None:
    split = connect.split_head(data)
    if split is not None:
        head, _ = split
        connect.parse_request(head)
        connect.parse_response(head)
    connect.response_traceparent(data)
    connect.response_peer_unreachable(data)
    return None


_CONNECT_SEEDS = (
    connect.encode_request(connect.ConnectRequest(_SVC, 8080, "west")),
    connect.encode_request(
        connect.ConnectRequest(_SVC, 8080, "west", _TRACE, (("version", "v2"), ("app", "echo")))
    ),
    connect.encode_response(200, "OK", _TRACE) + b"rest",
    connect.encode_response(502, "tunnel refused", peer_unreachable=True),
)

# --- FGH1 stream header (mesh/codec.py) -------------------------------------------------------


def run_fgh1(data: bytes) -> str | None:
    first, second = _split(data)
    if codec.split_frame(first) is not None:
        return None
    frame = codec.split_frame(first + second)
    if frame is not None:
        obj, _ = frame
        codec.header_from_json(obj)
        codec.reply_from_json(obj)
    return None


_FGH1_SEEDS = (
    b"\x00" + codec.encode_header(codec.StreamHeader(_SVC, 8080, "west")),
    b"\x07"
    + codec.encode_header(codec.StreamHeader(_SVC, 8080, "west", _TRACE, (("version", "v1"),))),
    b"\x05" + codec.encode_reply(codec.StreamReply(200, "ok", _TRACE)),
    b"\x03" + codec.encode_reply(codec.StreamReply(503, "no endpoint")),
)

# --- mux frames (mesh/mux.py) -------------------------------------------------------------------


def run_mux(data: bytes) -> str | None:
    first, second = _split(data)
    conn = mux.MuxConnection(is_client=bool(data[:1]) and data[0] & 1 == 1, max_streams=8)
    for part in (first, second):
        conn.receive_data(part)
        while (event := conn.next_event()) is not None:
            if isinstance(event, mux.StreamData) and conn.is_open(event.stream_id):
                conn.consumed(event.stream_id, len(event.data))
        conn.data_to_send()
    # A protocol violation is a connection error, an event rather than an exception.
    return f"connection error: {conn.error}" if conn.error is not None else None


def _mux_seed(is_client: bool) -> bytes:
    # What the peer of a connection would send: a READY, streams opened with data, a PING.
    peer = mux.MuxConnection(is_client=not is_client)
    peer.ready()
    for _ in range(2):
        sid = peer.open_stream()
        peer.send_data(sid, codec.encode_header(codec.StreamHeader(_SVC, 8080, "west")))
        peer.send_data(sid, b"hello", end_stream=True)
    peer.ping(7)
    peer.goaway("draining")
    return bytes([1 if is_client else 0]) + peer.data_to_send()


_MUX_SEEDS = (_mux_seed(True), _mux_seed(False))

# --- HTTP/1.1 (sidecar/http/codec.py) -------------------------------------------------------


def run_http(data: bytes) -> str | None:
    first, second = _split(data)
    reader = http.Reader("request" if data[:1] < b"\x80" else "response")
    reader.expect("HEAD" if data[:1] == b"\xff" else "GET")
    for n, part in enumerate((first, second)):
        reader.feed(part)
        if n == 1:
            reader.feed_eof()
        for _ in range(64):  # each event consumes input, so a few dozen drain it
            event = reader.next_event()
            if isinstance(event, http.NeedData | http.ConnectionClosed):
                break
            if isinstance(event, http.EndOfMessage):
                reader.next_message()
            elif isinstance(event, http.Request):
                http.request_framing(event)
    return None


_HTTP_SEEDS = (
    b"\x10GET / HTTP/1.1\r\nHost: echo\r\n\r\n",
    b"\x20POST /x HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n",
    b"\x30POST / HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
    b"X-T: 1\r\n\r\n",
    b"\x90HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabc",
    b"\xa0HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\n\r\n",
    b"\xffHTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nraw",
    b"\x05GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
)
_HTTP_TOKENS = (
    b"\r\n",
    b"\r\n\r\n",
    b"Content-Length: ",
    b"Transfer-Encoding: chunked",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b";",
    b"ffffffffffffffff",
    b"9" * 5000,
)

# --- DNS (sidecar/dns.py) ---------------------------------------------------------------------


def _lookup(key: ServiceKey) -> str | None:
    return "240.240.0.7" if key.name == "echo" else None


_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def run_dns(data: bytes) -> str | None:
    # respond() promises no exception at all: a bad query is FORMERR or silence.
    out = respond(data, _lookup)
    return "silent" if out is None else _RCODES.get(out[3] & 0xF, "other rcode")


def _query(name: str, qtype: int = TYPE_A, ident: int = 4660) -> bytes:
    return encode_message(Message(Header(ident, rd=True), Question(name, qtype, 1)))


_DNS_SEEDS = (
    _query("echo.demo.svc.clusterset.local"),
    _query("missing.demo.svc.clusterset.local"),
    _query("echo.demo.svc.clusterset.local", 28),
    _query("example.com"),
    # A compression pointer (0xc0 0x0c) back to the question's name, in an answer record.
    _query("echo.demo.svc.clusterset.local")[:7]
    + b"\x01"
    + _query("echo.demo.svc.clusterset.local")[8:]
    + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x0a\x00\x00\x01",
)

# --- config documents (federation/gitops) -------------------------------------------------------


def run_config(data: bytes) -> str | None:
    # validate_files reports every problem as an issue and raises nothing.
    issues = validate_files([SourceFile("federation.yaml", data)]).issues
    return f"issue: {issues[0].reason}" if issues else None


def _doc(kind: str, spec: str) -> bytes:
    head = f"apiVersion: fedgate.io/v1alpha1\nkind: {kind}\nmetadata: {{name: a, namespace: shop}}"
    return f"{head}\nspec: {{host: api.shop.svc.clusterset.local, {spec}}}\n".encode()


_AUTHZ = _doc(
    "AuthorizationPolicy",
    "rules: [{from: [{source: {principals: [spiffe://east.fedgate.local/ns/demo/sa/c]}}],"
    " to: [{operation: {ports: [8080]}}]}]",
)
_ROUTES = _doc(
    "TrafficPolicy",
    "subsets: [{name: v1, labels: {version: v1}}],"
    ' retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx,reset,503"},'
    " fault: {abort: {percentage: {value: 1.5}, httpStatus: 503}},"
    ' routes: [{name: canary, match: [{headers: {X-Canary: {exact: "1"}}}, {uri: {prefix: /b/}}],'
    " subsetWeights: [{subset: v1, weight: 100}], timeout: 10s}]",
)
_FEDERATION = config_repo.federation_yaml([("east", "us-east"), ("west", "us-west")]).encode()
_CONFIG_SEEDS = (
    _FEDERATION,
    config_repo.echo_policy(70, 30).encode(),
    _AUTHZ,
    _ROUTES,
    _FEDERATION + b"---\n" + config_repo.echo_policy(50, 50).encode(),
)
_CONFIG_TOKENS = (
    b"\n",
    b": ",
    b"- ",
    b"{",
    b"}",
    b"[",
    b"]",
    b"&a ",
    b"*a",
    b"!!binary ",
    b"---\n",
    b"kind: Federation\n",
    b"weight: ",
    b"1e309",
    b"-1",
    b"9" * 5000,
    b'"\\uD800"',
)

TARGETS = {
    t.name: t
    for t in (
        Target("connect", run_connect, (CodecError,), _CONNECT_SEEDS, _HTTP_TOKENS),
        Target("fgh1", run_fgh1, (CodecError,), _FGH1_SEEDS, (b'"', b"{}", b"9" * 5000)),
        Target("mux", run_mux, (), _MUX_SEEDS, (b"\x00" * 4, b"\xff" * 4)),
        Target("http1", run_http, (http.HttpProtocolError,), _HTTP_SEEDS, _HTTP_TOKENS),
        Target("dns", run_dns, (DnsFormatError,), _DNS_SEEDS, (b"\xc0", b"\x3f", b"\x00")),
        Target("config", run_config, (), _CONFIG_SEEDS, _CONFIG_TOKENS),
    )
}
