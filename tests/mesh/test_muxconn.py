"""The shared mux-over-TLS driver (`mesh.muxconn.MuxDriver`): stream events, backpressure
watching and the last stream's end, with two real `mesh.mux` connections back to back (no
TLS and no socket: the owners, `gateway.tls_tunnel` and `sidecar.smux`, have their own
end-to-end tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh import mux
from mesh.muxconn import MuxDriver


@dataclass(eq=False)
class Stream:
    id: int
    driver: Driver
    data: bytearray = field(default_factory=bytearray)
    fin: bool = False
    reset: int | None = None
    writable_calls: int = 0
    rewatch: bool = False  # write again from the callback and go over the mark

    def received(self, data: bytes, fin: bool) -> None:
        self.data += data
        self.fin = self.fin or fin

    def peer_reset(self, code: int) -> None:
        self.reset = code
        self.driver.forget(self)

    def check_writable(self) -> bool:
        self.writable_calls += 1
        if self.rewatch:
            self.rewatch = False
            self.driver.watch(self)
        return True


class Driver(MuxDriver[Stream]):
    """The hooks an owner implements, recording what the driver asked of them."""

    def __init__(self, is_client: bool) -> None:
        super().__init__(mux.MuxConnection(is_client=is_client))
        self.terminated: list[str] = []
        self.events: list[mux.Event] = []

    def _accept(self, stream_id: int) -> None:
        self.streams[stream_id] = Stream(stream_id, self)

    def _on_event(self, event: mux.Event) -> bool:
        self.events.append(event)
        return False

    def _terminated(self, reason: str) -> None:
        for stream in self._end(reason):
            stream.reset = -1
        self.terminated.append(self.close_reason)


def deliver(src: Driver, dst: Driver) -> None:
    dst.mux.receive_data(src.mux.data_to_send())
    dst._process_events()


async def test_stream_data_fin_and_resets_reach_their_streams() -> None:
    client, server = Driver(True), Driver(False)
    server.mux.ready()
    deliver(server, client)
    assert any(isinstance(e, mux.PeerReady) for e in client.events)
    sid = client.mux.open_stream()
    mine = client.streams[sid] = Stream(sid, client)
    assert client.send(sid, b"hello", True)
    deliver(client, server)
    theirs = server.streams[sid]
    assert (bytes(theirs.data), theirs.fin) == (b"hello", True)
    server.mux.reset_stream(sid, 7)
    deliver(server, client)
    assert mine.reset == 7
    assert sid not in client.streams
    assert not client.send(sid, b"late", False)  # reset meanwhile: refused, not raised


async def test_a_stream_that_goes_over_its_mark_from_its_callback_stays_watched() -> None:
    driver = Driver(True)
    stream = driver.streams[1] = Stream(1, driver, rewatch=True)
    driver.watch(stream)
    driver.resume_writing()  # the transport drained: watched streams are asked
    assert stream.writable_calls == 1
    assert stream in driver._watched  # it watched itself again from its callback
    driver.resume_writing()
    assert stream.writable_calls == 2
    assert stream not in driver._watched


async def test_a_retiring_connection_closes_when_its_last_stream_is_forgotten() -> None:
    driver = Driver(True)
    first, second = Stream(1, driver), Stream(3, driver)
    driver.streams.update({1: first, 3: second})
    driver.retire()
    assert driver.terminated == []
    driver.forget(first)
    driver.forget(first)  # twice is once
    assert driver.terminated == []
    driver.forget(second)
    assert driver.terminated == ["retired"]
    assert driver.mux.goaway_sent
    driver.close("again")  # closed already: nothing more
    assert driver.terminated == ["retired"]
