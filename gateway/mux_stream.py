"""One call over the `tls` transport: a stream of a `gateway.tls_tunnel.TlsTunnelConnection`,
implementing `gateway.transport.Stream` on top of the mux core (`mesh.mux`) and the shared
driver (`mesh.muxconn`).

Credit: bytes handed to the sink are reported consumed (the peer may send more) unless the
sink holds credit (its TCP write buffer is full) or no sink is attached yet; then they are
counted and reported on `release_credit`. The stream sees its connection as a `MuxOwner`, not
as the concrete class, so this module and the connection's do not import each other.
"""

from __future__ import annotations

from typing import Any, Protocol

from gateway.transport import RESET_PROTOCOL, BaseStream, SendMarks
from mesh import mux


class MuxOwner(Protocol):
    """What a `MuxStream` needs of its connection (`TlsTunnelConnection`)."""

    mux: mux.MuxConnection
    log: Any
    peer_cluster: str
    counters: dict[str, int]

    @property
    def settings(self) -> SendMarks: ...

    def send(self, stream_id: int, data: bytes, fin: bool) -> bool: ...

    def flush_soon(self) -> None: ...

    def write_backlog(self) -> int: ...

    def watch(self, stream: MuxStream) -> None: ...

    def forget(self, stream: MuxStream) -> None: ...


class MuxStream(BaseStream):
    """One call: a stream of a `TlsTunnelConnection`."""

    def __init__(self, conn: MuxOwner, stream_id: int) -> None:
        super().__init__()
        self.conn = conn
        self.id = stream_id
        self._held = True  # no sink yet: grant no credit beyond the initial window
        self._unconsumed = 0
        self._watching = False

    @property
    def log(self) -> Any:
        return self.conn.log

    @property
    def high_water(self) -> int:
        return self.conn.settings.send_high_water

    @property
    def peer_cluster(self) -> str:
        return self.conn.peer_cluster

    @property
    def counters(self) -> dict[str, int]:
        return self.conn.counters

    def _send(self, data: bytes, fin: bool) -> None:
        if not self.conn.send(self.id, data, fin):
            self.conn.log.debug("stream send refused", stream=self.id)
            self.send_done = True

    def _abort(self, code: int) -> None:
        if not (self.send_done and self.recv_done):
            self.conn.mux.reset_stream(self.id, code)
            self.conn.flush_soon()
        self.send_done = self.recv_done = True

    def _stop_reading(self) -> None:
        if not self.recv_done:
            self.recv_done = True
            # The reply and FIN are queued before it: the peer reads them, then the reset.
            self.conn.mux.reset_stream(self.id, RESET_PROTOCOL)
            self.conn.flush_soon()

    def _maybe_done(self) -> None:
        if self.send_done and self.recv_done:
            self.conn.forget(self)

    def backlog(self) -> int:
        return self.conn.mux.backlog(self.id) + self.conn.write_backlog()

    def notify_writable(self) -> None:
        if not self._watching:
            self._watching = True
            self.conn.watch(self)

    def hold_credit(self) -> None:
        self._held = True

    def release_credit(self) -> None:
        self._held = False
        if self._unconsumed:
            n, self._unconsumed = self._unconsumed, 0
            self.conn.mux.consumed(self.id, n)
            self.conn.flush_soon()

    # --- the driver's side (`mesh.muxconn.DrivenStream`) ----------------------------------

    def received(self, data: bytes, fin: bool) -> None:
        self._on_data(data, fin)
        if self._held:
            self._unconsumed += len(data)
        else:
            self.conn.mux.consumed(self.id, len(data))

    def peer_reset(self, code: int) -> None:
        self.send_done = self.recv_done = True
        self._on_abort(f"peer reset the stream ({code})", recv_finished=True)

    def check_writable(self) -> bool:
        if self.backlog() > self.conn.settings.send_low_water:
            return False
        self._watching = False
        if self._sink is not None:
            self._sink.stream_writable()
        return True

    def failed(self, reason: str) -> None:
        """The connection closed under this stream."""
        self.send_done = self.recv_done = True
        self._on_abort(f"tunnel connection closed: {reason}")
