"""The sans-I/O h2 gRPC client core against an in-memory h2 server, on a fake clock; and the
length-prefixed message decoder, which faces the network, with Hypothesis."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import grpcwire
from mesh.grpc_h2 import CallEnded, GrpcClientConnection, MessageReceived


class Server:
    """A bare h2 server: what a grpcio server puts on the wire, frame by frame."""

    def __init__(self) -> None:
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.h2.initiate_connection()
        self.events: list[h2.events.Event] = []

    def exchange(self, client: GrpcClientConnection, now: float = 0.0) -> None:
        """Move bytes both ways until neither side has anything to send."""
        while True:
            out = client.data_to_send()
            if out:
                self.events += self.h2.receive_data(out)
            back = self.h2.data_to_send()
            if back:
                client.receive_data(back, now)
            if not out and not back:
                return

    def send(self, sid: int, data: bytes) -> None:
        size = self.h2.max_outbound_frame_size
        for at in range(0, len(data), size):
            self.h2.send_data(sid, data[at : at + size])

    def respond(self, sid: int, *messages: bytes, status: int = 0, message: str = "") -> None:
        self.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        for m in messages:
            self.send(sid, grpcwire.frame(m))
        trailers = [("grpc-status", str(status))]
        if message:
            trailers.append(("grpc-message", grpcwire.encode_message(message)))
        self.h2.send_headers(sid, trailers, end_stream=True)


def events(client: GrpcClientConnection) -> list[object]:
    out: list[object] = []
    while (e := client.next_event()) is not None:
        out.append(e)
    return out


def connected(**options: float) -> tuple[GrpcClientConnection, Server]:
    client = GrpcClientConnection("controller.fedgate.local", **options)  # type: ignore[arg-type]
    client.initiate(0.0)
    server = Server()
    server.exchange(client)
    return client, server


def test_a_call_is_a_grpc_request_and_its_status_comes_from_the_trailers() -> None:
    client, server = connected()
    sid = client.start_call("/fedgate.config.v1.ConfigDiscovery/StreamConfig")
    client.send_message(sid, b"hello")
    server.exchange(client)
    request = next(e for e in server.events if isinstance(e, h2.events.RequestReceived))
    headers: dict[str, str] = dict(request.headers)  # type: ignore[arg-type]  # utf-8 str
    assert headers[":method"] == "POST"
    assert headers["content-type"] == "application/grpc"
    assert headers["te"] == "trailers"
    data = b"".join(e.data for e in server.events if isinstance(e, h2.events.DataReceived))
    assert data == grpcwire.frame(b"hello")
    server.respond(sid, b"one", b"two", status=grpcwire.PERMISSION_DENIED, message="nö")
    server.exchange(client)
    assert events(client) == [
        MessageReceived(sid, b"one"),
        MessageReceived(sid, b"two"),
        CallEnded(sid, grpcwire.PERMISSION_DENIED, "nö"),
    ]


def test_keepalive_pings_on_its_interval_and_a_late_ack_ends_the_connection() -> None:
    client, server = connected(keepalive_interval=30.0, keepalive_timeout=10.0)
    sid = client.start_call("/x/Y")
    server.exchange(client)
    assert client.get_timer() == 30.0
    client.handle_timer(29.9)
    assert client.data_to_send() == b""  # not yet
    client.handle_timer(30.0)
    server.exchange(client, now=30.5)  # the server acks the ping
    assert any(isinstance(e, h2.events.PingReceived) for e in server.events)
    assert client.get_timer() == 60.5  # the next ping, an interval after the ack
    client.handle_timer(60.5)
    client.data_to_send()  # the ping is lost: no ack comes
    assert client.get_timer() == 70.5
    client.handle_timer(70.5)
    assert client.closed_reason.startswith("keepalive ping not answered")
    assert events(client) == [CallEnded(sid, grpcwire.UNAVAILABLE, client.closed_reason)]
    assert client.get_timer() is None


def test_an_oversized_message_ends_the_call_before_it_is_buffered() -> None:
    client, server = connected(max_message=16)
    sid = client.start_call("/x/Y")
    server.exchange(client)
    server.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
    server.h2.send_data(sid, b"\x00" + (1 << 30).to_bytes(4, "big"))  # 1 GiB announced
    server.exchange(client)
    [ended] = events(client)
    assert isinstance(ended, CallEnded)
    assert ended.code == grpcwire.RESOURCE_EXHAUSTED
    assert any(isinstance(e, h2.events.StreamReset) for e in server.events)


def test_a_slow_reader_holds_the_window_until_it_takes_its_messages() -> None:
    client, server = connected()
    sid = client.start_call("/x/Y")
    server.exchange(client)
    server.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
    server.send(sid, grpcwire.frame(b"first"))
    server.exchange(client)
    before = server.h2.local_flow_control_window(sid)
    # While "first" waits for its reader, nothing more is given back, however much arrives
    # (a partial message alone is given back as it comes, or a large one could never finish).
    big = b"m" * 600_000
    server.send(sid, grpcwire.frame(big))
    server.exchange(client)
    held = server.h2.local_flow_control_window(sid)
    assert held == before - len(big) - 5
    assert events(client) == [MessageReceived(sid, b"first"), MessageReceived(sid, big)]
    client.delivered(sid)
    server.exchange(client)
    assert server.h2.local_flow_control_window(sid) == held  # one still waits
    client.delivered(sid)
    server.exchange(client)
    assert server.h2.local_flow_control_window(sid) >= held + len(big)


def test_a_graceful_goaway_keeps_open_calls_and_refuses_new_ones() -> None:
    client, server = connected()
    sid = client.start_call("/x/Y")
    server.exchange(client)
    server.h2.close_connection(last_stream_id=sid)
    server.h2.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN  # keep serving
    server.exchange(client)
    assert client.closing
    with pytest.raises(Exception, match="going away"):
        client.start_call("/x/Y")
    server.respond(sid, b"still here")
    server.exchange(client)
    assert events(client) == [MessageReceived(sid, b"still here"), CallEnded(sid, 0, "")]


def test_a_non_grpc_answer_is_a_status_not_a_crash() -> None:
    client, server = connected()
    sid = client.start_call("/x/Y")
    server.exchange(client)
    server.h2.send_headers(sid, [(":status", "503")], end_stream=True)
    server.exchange(client)
    assert events(client) == [CallEnded(sid, grpcwire.UNAVAILABLE, "HTTP status 503")]


@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(1, 50), max_size=40))
def test_messages_survive_any_split_into_frames(messages: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(grpcwire.frame(m) for m in messages)
    reader = grpcwire.MessageReader(1024)
    out: list[bytes] = []
    at = 0
    for n in [*cuts, len(wire)]:
        out += reader.feed(wire[at : at + n])
        at += n
    assert out == messages
    assert reader.pending == 0


@given(st.binary(max_size=200))
def test_the_decoder_refuses_garbage_only_with_a_framing_error(data: bytes) -> None:
    reader = grpcwire.MessageReader(64)
    code = grpcwire.OK
    try:
        messages = reader.feed(data)
    except grpcwire.FramingError as e:
        code, messages = e.code, []
    assert code in (grpcwire.OK, grpcwire.INTERNAL, grpcwire.RESOURCE_EXHAUSTED)
    assert all(len(m) <= 64 for m in messages)


def test_grpc_message_encoding_round_trips_and_codes_have_grpcio_names() -> None:
    assert grpcwire.decode_message(grpcwire.encode_message("héllo 100%\n")) == "héllo 100%\n"
    assert grpcwire.code_name(grpcwire.UNAVAILABLE) == "UNAVAILABLE"
    assert grpcwire.code_name(16) == "UNAUTHENTICATED"
