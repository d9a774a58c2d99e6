"""The one mux-over-TLS driver: what the gateway `tls` transport (`gateway.tls_tunnel`) and the
sidecars' smux (`sidecar.smux`) share around the `mesh.mux` core and a TLS session on memory
BIOs (issue 14: they were near copies, and batched their writes differently).

`MuxDriver` owns the stream table, the send side (flush scheduling, `encrypt`'s one write-batching
policy, one `writelines`), transport backpressure (`pause_writing`/`write_backlog`, streams
watched until their backlog is under the low-water mark), the dispatch of stream events to
the streams, and retire/close/forget. The owners keep what differs and must not change: the
gateway's handshake and peer authorization before any stream, its health PINGs and receive
idle timeout; the sidecar's adoption of a `sidecar.pipe.Conn` whose handshake is done, and its
no-streams idle timeout; each one's logged reasons, decryption and teardown (`_terminated`).
Streams are anything with the small `DrivenStream` shape; the streams see their connection
through protocol classes of their own (`gateway.mux_stream.MuxOwner`,
`sidecar.smux_stream.SmuxOwner`), never the concrete class, so no import cycle.

Why here, in `mesh`: it is the only package both `gateway` and `sidecar` may import besides `ca`
(the certificate authority, no place for a stream driver), and it already holds the asyncio
task helpers (`mesh.tasks`). It does no socket or TLS I/O of its own and imports no `ssl`
(the `mesh-pure` contract forbids it): the owner lends the TLS session as two callables,
`SSL_write` and the outgoing BIO's read, and `ssl.SSLError`, an `OSError`, is caught as such and
named by the owner (`_tls_failure`). Writes go to the asyncio transport the owner hands over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from mesh import mux

TLS_RECORD = 16 * 1024  # the largest TLS plaintext record (RFC 8446 §5.1)
ENCRYPT_BATCH = 4 * TLS_RECORD  # plaintext per SSL_write (see `encrypt`)

Seal = Callable[
    [bytes | bytearray | memoryview], object
]  # `ssl.SSLObject.write`: plaintext in (raises ssl.SSLError)
Take = Callable[[], bytes]  # `ssl.MemoryBIO.read` of the outgoing BIO: ciphertext out


def encrypt(seal: Seal, take: Take, chunks: list[bytes], out: list[bytes]) -> None:
    """Encrypt `chunks` (the mux's output) into `out`, at most `ENCRYPT_BATCH` bytes per
    `SSL_write` (`seal`), emptying the outgoing BIO (`take`) after each. Raises ssl.SSLError.

    One flush carries every stream's frames since the last one (up to megabytes under load).
    Joining them first, then encrypting them in one call, copied everything once more and grew
    the outgoing BIO to that size (a realloc, a copy and a wipe of the old buffer each time it
    grew, on memory no longer in cache). Here small frames are coalesced (a header or a WINDOW
    frame alone would be a record of its own), large payloads are encrypted from memoryview
    slices in place, and the BIO stays small and warm. A batch is a multiple of the 16 KiB
    record size, and what precedes a large payload is topped up to whole records from it, so
    records stay full: only the last record of a batch may be short."""
    small = bytearray()
    for chunk in chunks:
        if len(small) + len(chunk) <= ENCRYPT_BATCH:
            small += chunk
            continue
        view = memoryview(chunk)
        if small:
            cut = -len(small) % TLS_RECORD  # top up to whole records
            small += view[:cut]
            view = view[cut:]
            seal(small)
            out.append(take())
            small = bytearray()
        for start in range(0, len(view), ENCRYPT_BATCH):
            seal(view[start : start + ENCRYPT_BATCH])
            out.append(take())
    if small:
        seal(small)
        out.append(take())


class DrivenStream(Protocol):
    """What the driver needs of a stream."""

    @property
    def id(self) -> int: ...

    def received(self, data: bytes, fin: bool) -> None:
        """Payload (and the peer's FIN) for this stream."""

    def peer_reset(self, code: int) -> None:
        """The peer reset the stream (mux RESET)."""

    def check_writable(self) -> bool:
        """Called while watched, when the backlog may have shrunk; True: stop watching."""


S = TypeVar("S", bound=DrivenStream)


class MuxDriver(Generic[S]):
    """The shared half of a mux-over-TLS connection (see the module docstring). The owner
    subclasses it with an `asyncio` protocol, sets `_transport` and `_records` (and `_sealing`
    once stream frames may go out), and implements `_accept`, `_on_event` and `_terminated`."""

    def __init__(self, mux_conn: mux.MuxConnection) -> None:
        self.mux = mux_conn
        self.streams: dict[int, S] = {}
        self.retiring = False
        self.close_reason = ""
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._records: tuple[Seal, Take] | None = None
        self._sealing = True  # stream frames may be sent (the gateway: once authenticated)
        self._ended = False  # `_end` ran: the connection is closed
        self._flush_handle: asyncio.Handle | None = None
        self._in_receive = False  # feeding the mux: the flush after it sends everything
        self._paused = False  # the transport's write buffer is above its high-water mark
        self._watched: set[S] = set()

    # --- hooks ----------------------------------------------------------------------------

    def _accept(self, stream_id: int) -> None:
        """The peer opened a stream."""
        raise NotImplementedError

    def _on_event(self, event: mux.Event) -> bool:
        """A connection-level mux event; True: stop processing (the connection is closed)."""
        raise NotImplementedError

    def _terminated(self, reason: str) -> None:
        """The connection is gone: `_end` it, fail its streams, close the transport."""
        raise NotImplementedError

    def _tls_failure(self, e: OSError) -> str:
        """The logged reason for a TLS error (an `ssl.SSLError`) while encrypting."""
        return f"tls error: {getattr(e, 'reason', None) or e}"

    def _idle(self) -> None:
        """The last open stream is done."""
        if self.retiring:
            self.close("retired")

    # --- the streams' side ----------------------------------------------------------------

    def write_backlog(self) -> int:
        """What waits in the transport's write buffer, counted while it is above its mark."""
        t = self._transport
        return t.get_write_buffer_size() if self._paused and t is not None else 0

    def send(self, stream_id: int, data: bytes, fin: bool) -> bool:
        """Queue a stream's bytes (and FIN); False if the stream was reset meanwhile."""
        try:
            self.mux.send_data(stream_id, data, fin)
        except mux.MuxError:
            return False
        self.flush_soon()
        return True

    def watch(self, stream: S) -> None:
        """Call `stream.check_writable()` as the backlog shrinks, until it returns True."""
        self._watched.add(stream)

    def forget(self, stream: S) -> None:
        """`stream` is finished both ways (FINs or a reset)."""
        if self.streams.pop(stream.id, None) is None:
            return
        self._watched.discard(stream)
        if not self.streams:
            self._idle()

    def flush_soon(self) -> None:
        if self._flush_handle is None and not self._in_receive and not self._ended:
            self._flush_handle = self._loop.call_soon(self._flush)

    # --- lifecycle ------------------------------------------------------------------------

    def retire(self) -> None:
        """Take no new streams; close once the open ones are done."""
        self.retiring = True
        if not self.streams:
            self.close("retired")

    def close(self, reason: str, code: int = 0) -> None:
        """Tell the peer why (GOAWAY) and close; open streams are reset. `code` is unused: the
        gateway's pool closes every transport's connections alike (QUIC sends a code)."""
        if self._ended:
            return
        self.close_reason = self.close_reason or reason
        self.mux.goaway(reason)
        self._flush()
        self._terminated(reason)

    def _end(self, reason: str) -> list[S]:
        """Mark the connection closed (first reason wins); the streams it had, to be failed."""
        self._ended = True
        self.close_reason = self.close_reason or reason
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        streams = list(self.streams.values())
        self.streams.clear()
        self._watched.clear()
        return streams

    # --- asyncio.Protocol (write side) ----------------------------------------------------

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._check_writable()

    # --- driver ---------------------------------------------------------------------------

    def _process_events(self) -> None:
        mux_conn = self.mux
        streams = self.streams
        while (event := mux_conn.next_event()) is not None:
            match event:
                case mux.StreamData(stream_id, data, end_stream):
                    stream = streams.get(stream_id)
                    if stream is not None:
                        stream.received(data, end_stream)
                case mux.StreamOpened(stream_id):
                    self._accept(stream_id)
                case mux.StreamReset(stream_id, code):
                    stream = streams.get(stream_id)
                    if stream is not None:
                        stream.peer_reset(code)
                case _:
                    if self._on_event(event):
                        return
        if self._watched:
            self._check_writable()

    def _check_writable(self) -> None:
        for stream in list(self._watched):
            # Out of the set before the call: a stream that writes again from its callback
            # and goes over the mark is watched anew.
            self._watched.discard(stream)
            if not stream.check_writable():
                self._watched.add(stream)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        transport, records = self._transport, self._records
        if transport is None or records is None or transport.is_closing():
            return
        seal, take = records
        out: list[bytes] = []
        chunks = self.mux.pieces_to_send() if self._sealing else []
        if chunks:
            try:
                encrypt(seal, take, chunks, out)
            except OSError as e:  # ssl.SSLError (mesh does not import ssl)
                self._terminated(self._tls_failure(e))
                return
        data = take()  # handshake records, or an alert, queued outside `encrypt`
        if data:
            out.append(data)
        if len(out) == 1:
            transport.write(out[0])
        elif out:
            transport.writelines(out)  # one writev with uvloop
        if self._watched:
            self._check_writable()
