"""Zero-copy relay between two connected TCP sockets: `os.splice` through a pipe per direction,
driven by the event loop's readiness callbacks (no byte enters Python).

Used by the `passthrough` transport once a call is routed: both gateways only move the inner
end-to-end TLS bytes, so neither needs to read them (DESIGN: "os.splice through a pipe, driven
by the event loop, is fastest where no byte needs reading").

Per direction src -> dst: read at most one pipe's worth from src, write it all to dst; while dst
cannot take it, stop reading src (backpressure is TCP's own). EOF from src becomes
`shutdown(dst, SHUT_WR)` once the pipe is empty (half-close). An error on either socket
(reset, broken pipe) resets both (SO_LINGER 0), so each end sees the call fail rather than a
silently short stream. Once both directions ended cleanly, both sockets are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
from collections.abc import Callable

PIPE_SIZE = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_LINGER_RESET = struct.pack("ii", 1, 0)

Done = Callable[[str, int, int], None]
"""on_done(outcome, bytes a->b, bytes b->a); outcome "ok" or the reason it failed."""


def available() -> bool:
    return hasattr(os, "splice")


class _Direction:
    def __init__(self, relay: SocketRelay, src: int, dst: int, ended: bool) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.bytes = 0
        self.eof = ended  # src already ended (its FIN was forwarded before the handoff)
        self.done = ended
        self.in_pipe = 0
        self.reading = False
        self.writing = False
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe only costs more wake-ups
            fcntl.fcntl(self.w, _F_SETPIPE_SZ, PIPE_SIZE)
        self.chunk = fcntl.fcntl(self.w, getattr(fcntl, "F_GETPIPE_SZ", 1032))

    def start(self) -> None:
        if not self.eof:
            self._read_on()

    def _read_on(self) -> None:
        if not self.reading:
            self.reading = True
            self.relay.loop.add_reader(self.src, self.readable)

    def _read_off(self) -> None:
        if self.reading:
            self.reading = False
            self.relay.loop.remove_reader(self.src)

    def readable(self) -> None:
        try:
            n = os.splice(self.src, self.w, self.chunk, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as e:
            self.relay.fail(f"connection failed: {e.strerror or e}")
            return
        if n == 0:
            self.eof = True
            self._read_off()
        else:
            self.in_pipe += n
            self.bytes += n
        self.flush()

    def flush(self) -> None:
        while self.in_pipe:
            try:
                n = os.splice(self.r, self.dst, self.in_pipe, flags=_FLAGS)
            except BlockingIOError:
                self._read_off()  # dst is full: read no more until it drains
                if not self.writing:
                    self.writing = True
                    self.relay.loop.add_writer(self.dst, self.flush)
                return
            except OSError as e:
                self.relay.fail(f"connection failed: {e.strerror or e}")
                return
            self.in_pipe -= n
        if self.writing:
            self.writing = False
            self.relay.loop.remove_writer(self.dst)
        if not self.eof:
            self._read_on()
        elif not self.done:
            self.done = True
            with contextlib.suppress(OSError):
                _shutdown_write(self.dst)
            self.relay.check()

    def stop(self) -> None:
        self._read_off()
        if self.writing:
            self.writing = False
            self.relay.loop.remove_writer(self.dst)
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _shutdown_write(fd: int) -> None:
    s = socket.socket(fileno=os.dup(fd))
    try:
        s.shutdown(socket.SHUT_WR)
    finally:
        s.close()


class SocketRelay:
    """Relays between sockets `a` and `b` (file descriptors it owns and closes)."""

    def __init__(
        self, a: int, b: int, on_done: Done, *, a_ended: bool = False, b_ended: bool = False
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.a = a
        self.b = b
        self._on_done = on_done
        self.finished = False
        self._ab = _Direction(self, a, b, a_ended)
        self._ba = _Direction(self, b, a, b_ended)

    def start(self) -> None:
        self._ab.start()
        self._ba.start()
        self.check()

    def check(self) -> None:
        if self._ab.done and self._ba.done and not self.finished:
            self._end("ok", reset=False)

    def fail(self, reason: str) -> None:
        if not self.finished:
            self._end(reason, reset=True)

    def _end(self, outcome: str, *, reset: bool) -> None:
        self.finished = True
        for d in (self._ab, self._ba):
            d.stop()
        for fd in (self.a, self.b):
            if reset:
                with contextlib.suppress(OSError):
                    s = socket.socket(fileno=os.dup(fd))
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    s.close()  # the dup: SO_LINGER is a property of the socket, not the fd
            with contextlib.suppress(OSError):
                os.close(fd)
        self._on_done(outcome, self._ab.bytes, self._ba.bytes)
