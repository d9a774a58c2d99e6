"""The `tls` transport's mux core, pure: two instances wired back to back in memory, and
Hypothesis fuzzing of the decoder a peer reaches (garbage never raises out of it)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import mux


def pump(a: mux.MuxConnection, b: mux.MuxConnection, chunk: int = 0) -> list[mux.Event]:
    """Move a's output into b (in `chunk`-byte pieces if given); return b's events."""
    data = a.data_to_send()
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        b.receive_data(data[i : i + step])
    events = []
    while (e := b.next_event()) is not None:
        events.append(e)
    return events


def received(events: list[mux.Event], sid: int) -> tuple[bytes, bool]:
    data = b"".join(e.data for e in events if isinstance(e, mux.StreamData) and e.stream_id == sid)
    fin = any(isinstance(e, mux.StreamData) and e.end_stream for e in events)
    return data, fin


def test_stream_roundtrip_with_half_close_at_every_split() -> None:
    for chunk in (1, 3, 10, 11, 0):
        c = mux.MuxConnection(is_client=True)
        s = mux.MuxConnection(is_client=False)
        sid = c.open_stream()
        c.send_data(sid, b"hello", end_stream=True)
        events = pump(c, s, chunk)
        assert events[0] == mux.StreamOpened(sid)
        assert received(events, sid) == (b"hello", True)
        s.send_data(sid, b"world", end_stream=True)
        assert received(pump(s, c, chunk), sid) == (b"world", True)
        assert not c.is_open(sid)
        assert not s.is_open(sid)


def test_flow_control_buffers_beyond_the_window_until_consumed() -> None:
    c = mux.MuxConnection(is_client=True)
    s = mux.MuxConnection(is_client=False)  # window == INITIAL_WINDOW: no extra grant
    sid = c.open_stream()
    big = b"x" * (mux.INITIAL_WINDOW + 1000)
    c.send_data(sid, big)
    assert c.backlog(sid) == 1000
    data, _ = received(pump(c, s), sid)
    assert len(data) == mux.INITIAL_WINDOW
    s.consumed(sid, 100)  # below a quarter of the window: no WINDOW frame yet
    assert s.data_to_send() == b""
    s.consumed(sid, mux.INITIAL_WINDOW)
    pump(s, c)
    assert c.backlog(sid) == 0
    assert len(received(pump(c, s), sid)[0]) == 1000


def test_pieces_to_send_are_the_pieces_of_data_to_send() -> None:
    payload = bytes(range(256)) * 256  # within the initial window: sent at once
    frames = []
    for take in ("pieces", "joined"):
        c = mux.MuxConnection(is_client=True)
        sid = c.open_stream()
        c.send_data(sid, b"head")
        c.send_data(sid, payload, end_stream=True)
        c.ping(7)
        if take == "pieces":
            pieces = c.pieces_to_send()
            assert any(p is payload for p in pieces)  # handed over, not copied
            frames.append(b"".join(pieces))
            assert c.pieces_to_send() == []
        else:
            frames.append(c.data_to_send())
    assert frames[0] == frames[1]
    s = mux.MuxConnection(is_client=False)
    s.receive_data(frames[0])
    events = []
    while (e := s.next_event()) is not None:
        events.append(e)
    assert received(events, 1) == (b"head" + payload, True)


def test_payloads_received_from_a_reused_buffer_are_copied_out() -> None:
    c = mux.MuxConnection(is_client=True)
    s = mux.MuxConnection(is_client=False)
    sid = c.open_stream()
    c.send_data(sid, b"a" * 5000)
    c.send_data(sid, b"b" * 3000, end_stream=True)
    wire = c.data_to_send()
    buf = bytearray(4096)  # a driver's decrypt buffer, refilled for every batch
    for i in range(0, len(wire), len(buf)):
        piece = wire[i : i + len(buf)]
        buf[: len(piece)] = piece
        s.receive_data(memoryview(buf)[: len(piece)])
    buf[:] = bytes(len(buf))  # overwritten: what the events hold must not change
    events = []
    while (e := s.next_event()) is not None:
        events.append(e)
    assert all(type(e.data) is bytes for e in events if isinstance(e, mux.StreamData))
    assert received(events, sid) == (b"a" * 5000 + b"b" * 3000, True)


def test_a_larger_receive_window_is_granted_on_open() -> None:
    c = mux.MuxConnection(is_client=True)
    s = mux.MuxConnection(is_client=False, window=4 * mux.INITIAL_WINDOW)
    sid = c.open_stream()
    c.send_data(sid, b"h")
    pump(c, s)
    pump(s, c)
    c.send_data(sid, b"y" * (4 * mux.INITIAL_WINDOW))
    assert c.backlog(sid) == 1


def test_data_beyond_the_window_is_a_connection_error() -> None:
    s = mux.MuxConnection(is_client=False)
    s.receive_data(mux.FRAME.pack(mux.DATA, 0, 1, mux.INITIAL_WINDOW + 1))
    events = pump(mux.MuxConnection(is_client=True), s)
    assert any(isinstance(e, mux.ConnectionFailed) for e in events)
    assert b"beyond its window" in s.data_to_send()


def test_reset_aborts_both_sides_and_late_frames_are_ignored() -> None:
    c = mux.MuxConnection(is_client=True)
    s = mux.MuxConnection(is_client=False)
    sid = c.open_stream()
    c.send_data(sid, b"a")
    pump(c, s)
    s.reset_stream(sid, 7)
    c.send_data(sid, b"late")  # crosses the reset on the wire
    assert mux.StreamReset(sid, 7) in pump(s, c)
    assert pump(c, s) == []  # the late DATA is discarded
    assert not c.is_open(sid)
    assert s.error is None


def test_goaway_refuses_new_streams_and_keeps_old_ones() -> None:
    c = mux.MuxConnection(is_client=True)
    s = mux.MuxConnection(is_client=False)
    old = c.open_stream()
    c.send_data(old, b"1")
    pump(c, s)
    s.goaway("draining")
    events = pump(s, c)
    assert mux.GoAway(old, "draining") in events
    c.send_data(old, b"2")
    assert received(pump(c, s), old) == (b"2", False)
    raw = mux.MuxConnection(is_client=True)  # a client ignoring the GOAWAY
    raw._next_local = 99
    sid = raw.open_stream()
    raw.send_data(sid, b"x")
    s.receive_data(raw.data_to_send())
    assert mux.FRAME.pack(mux.RESET, 0, sid, mux.RESET_REFUSED) in s.data_to_send()


def test_too_many_streams_are_refused() -> None:
    c = mux.MuxConnection(is_client=True)
    s = mux.MuxConnection(is_client=False, max_streams=2)
    sids = [c.open_stream() for _ in range(3)]
    for sid in sids:
        c.send_data(sid, b"x")
    events = pump(c, s)
    assert [e.stream_id for e in events if isinstance(e, mux.StreamOpened)] == sids[:2]
    assert mux.StreamReset(sids[2], mux.RESET_REFUSED) in pump(s, c)


def test_ping_is_answered() -> None:
    c = mux.MuxConnection(is_client=True)
    s = mux.MuxConnection(is_client=False)
    c.ping(42)
    pump(c, s)
    assert pump(s, c) == [mux.PingAcked(42)]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=10))
def test_fuzz_garbage_never_raises(chunks: list[bytes]) -> None:
    s = mux.MuxConnection(is_client=False)
    for chunk in chunks:
        s.receive_data(chunk)
        while s.next_event() is not None:
            pass
    s.data_to_send()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 7), st.integers(0, 3), st.integers(0, 9), st.integers(0, 2**32 - 1)
        ),
        max_size=8,
    ),
    st.binary(max_size=64),
)
def test_fuzz_well_formed_frame_headers_never_raise(
    frames: list[tuple[int, int, int, int]], tail: bytes
) -> None:
    s = mux.MuxConnection(is_client=False)
    wire = b"".join(mux.FRAME.pack(t, f, sid, v % 70000) for t, f, sid, v in frames) + tail
    s.receive_data(wire)
    while s.next_event() is not None:
        pass
