"""Every line a fedgate process writes to stderr is JSON, including what gRPC's C core writes.

gRPC's C core logs with its own writer straight to file descriptor 2, one glog-style line per
message (`I1206 10:52:19.506608   24881 ssl_transport_security.cc:2563] Handshake failed ...`),
past Python's logging. So a long-running process calls `take_over_stderr()` before anything
imports grpc, which does two things:

1. `prepare_grpc()` (the C core reads its settings at import): fork support off, so running
   git from the GitOps poll no longer logs `fork_posix.cc:71] Other threads are currently
   calling into gRPC, skipping fork() handlers` on every fork (fedgate never forks a process
   that goes on using gRPC: children exec at once); and the `handshaker` tracer on, whose
   failure line is the only one that names the peer of a failed TLS handshake.
2. `capture_stderr()`: descriptor 2 becomes a pipe. A thread reads it and re-emits each line
   through structlog (`fedgate.logs` writes to the original stderr): a failed handshake once, as
   `grpc handshake failed` with `peer` and `reason`; the tracer's other lines are dropped; any
   other C-core message as `grpc core` at its level; JSON lines (a child process's) unchanged;
   anything else (a traceback) as one `stderr` event per burst. Before structlog is set up
   (`start_emitting`), the thread writes plain JSON lines itself: the pipe never fills.

`CoreLines` is the parser and does no I/O; the thread is the driver. What this does not do:
configure structlog (`fedgate.logs`) or change what gRPC logs beyond the two settings.
"""

from __future__ import annotations

import atexit
import contextvars
import json
import os
import re
import select
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

# Read by the C core when grpc is imported; an operator's own values win.
GRPC_ENV = {"GRPC_ENABLE_FORK_SUPPORT": "0", "GRPC_TRACE": "handshaker"}

_GLOG = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([\w./-]+:\d+)\] ?(.*)$")
_LEVELS = {"I": "info", "W": "warning", "E": "error", "F": "critical"}
_PEER = re.compile(r"endpoint_peer_address=(?:ipv[46]:)?([^,}\s]+)")
_LOCAL = re.compile(r"endpoint_local_address=(?:ipv[46]:)?([^,}\s]+)")
_SSL_REASON = re.compile(r"OPENSSL_internal:([A-Z0-9_]+)")
# The tracer's lines about handshakes that went on, and its second report of a failure.
_TRACE_SOURCES = ("handshaker.cc", "channel_trace.h", "trace.cc")


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    peer: str
    local: str
    reason: str  # the TLS alert or OpenSSL reason when there is one, else the gRPC status
    error: str


@dataclass(frozen=True, slots=True)
class CoreMessage:
    level: str
    source: str  # file.cc:line
    message: str


@dataclass(frozen=True, slots=True)
class JsonLine:
    text: str


@dataclass(frozen=True, slots=True)
class StrayText:
    text: str


Record = HandshakeFailed | CoreMessage | JsonLine | StrayText


class CoreLines:
    """Lines in (without their newline), records out. A C-core message may span lines (a
    status with its source trace): lines without a glog prefix continue the current message
    until the next prefix, a JSON line or `flush()` (the driver calls it when the pipe is
    quiet)."""

    def __init__(self, *, traced: bool) -> None:
        # Without the tracer, the SSL layer's own line is the only report of a failure.
        self._traced = traced
        self._pending: list[str] = []
        self._header: tuple[str, str] | None = None  # (level letter, source)

    @property
    def pending(self) -> bool:
        """Whether lines wait for the next line or `flush()` to be a record."""
        return bool(self._pending)

    def feed(self, line: str) -> list[Record]:
        out: list[Record] = []
        glog = _GLOG.match(line)
        if glog is not None:
            out += self.flush()
            self._header = (glog.group(1), glog.group(2))
            self._pending = [glog.group(3)]
            return out
        stripped = line.strip()
        if stripped.startswith("{"):
            try:
                is_object = isinstance(json.loads(stripped), dict)
            except ValueError:
                is_object = False
            if is_object:
                return [*self.flush(), JsonLine(stripped)]
        if stripped or self._pending:
            self._pending.append(line)
        return out

    def flush(self) -> list[Record]:
        pending, header = self._pending, self._header
        self._pending, self._header = [], None
        text = "\n".join(pending).strip()
        if not text:
            return []
        if header is None:
            return [StrayText(text)]
        level, source = header
        return self._core(level, source, text)

    def _core(self, level: str, source: str, text: str) -> list[Record]:
        file = source.rsplit(":", 1)[0].rsplit("/", 1)[-1]
        if file == "handshaker.cc" and "error=" in text and "error=OK" not in text:
            peer = _first(_PEER, text)
            if not peer:  # a client's connect failed: no handshake, and gRPC reports it to us
                return []
            error = text.split("error=", 1)[1].split("\n", 1)[0].removesuffix(": OK").strip()
            return [HandshakeFailed(peer, _first(_LOCAL, text), _why(error), error)]
        if file in _TRACE_SOURCES:
            return []
        if file == "ssl_transport_security.cc" and "Handshake failed" in text:
            if self._traced:
                return []  # reported with its peer by the handshaker line that follows
            return [HandshakeFailed("", "", _why(text), text)]
        return [CoreMessage(_LEVELS[level], source, text)]


def _first(pattern: re.Pattern[str], text: str) -> str:
    found = pattern.search(text)
    return found.group(1) if found else ""


def _why(error: str) -> str:
    ssl = _SSL_REASON.search(error)
    return ssl.group(1) if ssl else error.split("\n", 1)[0]


def prepare_grpc() -> None:
    """Set `GRPC_ENV` for the C core; to be called before anything imports grpc."""
    for name, value in GRPC_ENV.items():
        os.environ.setdefault(name, value)


def _traced() -> bool:
    """Whether the C core runs the handshaker tracer (it read the environment at import)."""
    return "grpc" not in sys.modules and "handshaker" in os.environ.get("GRPC_TRACE", "")


def describe(record: Record) -> tuple[str, str, dict[str, str]] | None:
    """(level, event, fields) to log a record with; None for a JSON line (written as it is)."""
    match record:
        case HandshakeFailed(peer, local, reason, error):
            fields = {"peer": peer, "local": local, "reason": reason, "error": error}
            return "warning", "grpc handshake failed", fields
        case CoreMessage(level, source, message):
            return level, "grpc core", {"source": source, "message": message}
        case StrayText(text):
            return "warning", "stderr", {"text": text}
        case JsonLine():
            return None
        case _:
            raise AssertionError(f"unknown record {record!r}")


Emit = Callable[[Record], None]


class _Capture:
    """The driver: descriptor 2 is a pipe; a thread reads it, `CoreLines` parses, and `emit`
    logs (until there is one, a plain JSON line goes to the original stderr: nothing is lost
    and the pipe never fills)."""

    QUIET = 0.1  # seconds without a new line that end a multi-line message

    def __init__(self) -> None:
        self.original = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8")
        self._read_fd, write_fd = os.pipe()
        self._lines = CoreLines(traced=_traced())
        self._emit: Emit | None = None
        sys.stderr.flush()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._thread = threading.Thread(target=self._run, name="native-stderr", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def start(self, emit: Emit) -> None:
        """Log through `emit`, in the caller's context (structlog's bound variables)."""
        context = contextvars.copy_context()
        self._emit = lambda record: context.run(emit, record)

    def _run(self) -> None:
        buffered = b""
        while True:
            # Wake up only to end a message that may go on: an idle process sleeps here.
            quiet = self.QUIET if self._lines.pending else None
            ready, _, _ = select.select([self._read_fd], [], [], quiet)
            if not ready:
                self._send(self._lines.flush())
                continue
            chunk = os.read(self._read_fd, 65536)
            if not chunk:
                break
            *lines, buffered = (buffered + chunk).split(b"\n")
            for raw in lines:
                self._send(self._lines.feed(raw.decode("utf-8", "replace")))
        if buffered:
            self._send(self._lines.feed(buffered.decode("utf-8", "replace")))
        self._send(self._lines.flush())

    def _send(self, records: list[Record]) -> None:
        for record in records:
            emit = self._emit
            if emit is not None:
                emit(record)
                continue
            described = describe(record)
            if described is None:
                assert isinstance(record, JsonLine)
                self.original.write(record.text + "\n")
            else:
                level, event, fields = described
                line = {**fields, "event": event, "level": level, "logger": "fedgate.native"}
                self.original.write(json.dumps(line) + "\n")

    def close(self) -> None:
        """At exit: stderr back to the original, then what the pipe still holds (bounded: a
        child may hold the pipe open)."""
        sys.stderr.flush()
        os.dup2(self.original.fileno(), 2)
        self._thread.join(timeout=1.0)


_capture: list[_Capture] = []


def capture_stderr() -> None:
    """Route descriptor 2 through the parser (once per process). Records wait (in the pipe)
    until `start_emitting()`."""
    if not _capture:
        _capture.append(_Capture())


def original_stderr() -> TextIO | None:
    """Where log lines go while stderr is captured (None: it is not)."""
    return _capture[0].original if _capture else None


def start_emitting(emit: Emit) -> None:
    """Begin re-emitting captured lines through `emit` (no-op unless `capture_stderr()` ran)."""
    if _capture:
        _capture[0].start(emit)


def take_over_stderr() -> None:
    """Both steps, for a long-running process; call it before anything imports grpc."""
    prepare_grpc()
    capture_stderr()
