"""structlog JSON logs for every fedgate process, stdlib logging routed through the same pipe.

One JSON object per line on stderr, with `component` and `cluster` bound once at start-up and
connection ids bound by the drivers. Nothing here ever formats a key: `Svid.__repr__` hides it.
In a long-running process whose stderr `fedgate.native_logs` captured, the handler writes to
the original stderr and what gRPC's C core writes comes back here as JSON too.

Our own lines (structlog's loggers: every access line) are rendered by structlog and written
straight to the handler's stream (`_LineWriter`), with no stdlib `LogRecord` round trip: that
trip (a record, a copy of it in `ProcessorFormatter`, the handler chain) was most of an access
line's cost (docs/footprint.md). Levels below the configured one cost a no-op call. The line is
what the stdlib route rendered, field for field and in the same order (tested against it), on
the same stream, under the handler's lock (the native-stderr thread logs too). Other
libraries' stdlib records (grpc, aioquic, kubernetes) still take the handler and its formatter.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from fedgate import native_logs


def configure(component: str, cluster: str = "", level: str = "INFO") -> None:
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    render: list[structlog.typing.Processor] = [
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(),
    ]
    root = logging.getLogger()
    root.setLevel(level)  # validates `level` as stdlib does
    handler = logging.StreamHandler(native_logs.original_stderr() or sys.stderr)
    structlog.configure(
        processors=[*shared, *render],
        logger_factory=_LineWriterFactory(handler),
        wrapper_class=structlog.make_filtering_bound_logger(root.level),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
    )
    _skip_unused_record_fields()
    handler.setFormatter(formatter)
    root.handlers[:] = [handler]
    # grpc and aioquic are chatty at INFO about internals an operator cannot act on.
    logging.getLogger("quic").setLevel(logging.WARNING)
    logging.getLogger("grpc").setLevel(logging.WARNING)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(component=component)
    if cluster:
        structlog.contextvars.bind_contextvars(cluster=cluster)
    native_logs.start_emitting(lambda record: _emit(handler, record))


class _LineWriter:
    """structlog's logger for our own lines: each method writes the line structlog rendered
    (JSON) to the handler's stream, as `StreamHandler.emit` did, flushed."""

    def __init__(self, name: str, handler: logging.StreamHandler[TextIO]) -> None:
        self.name = name  # `add_logger_name` reads it
        self._handler = handler

    def write(self, line: str) -> None:
        handler = self._handler
        with handler.lock:  # type: ignore[union-attr]  # a Handler always creates its lock
            try:
                stream = handler.stream
                stream.write(line + "\n")
                stream.flush()
            except RecursionError:
                raise
            except Exception:  # as stdlib logging: a broken stream never fails the caller
                handler.handleError(logging.makeLogRecord({"msg": line, "name": self.name}))

    debug = info = warning = error = critical = exception = msg = write


class _LineWriterFactory:
    """`structlog.get_logger(name)` -> a `_LineWriter` named as stdlib's logger would be."""

    def __init__(self, handler: logging.StreamHandler[TextIO]) -> None:
        self._handler = handler
        # Unnamed loggers take the caller's module name, as with stdlib's factory.
        self._unnamed = structlog.stdlib.LoggerFactory(ignore_frame_names=[__name__])

    def __call__(self, *args: object) -> _LineWriter:
        name = str(args[0]) if args else self._unnamed().name
        return _LineWriter(name, self._handler)


def _skip_unused_record_fields() -> None:
    """Stop stdlib logging from computing what no line of ours shows: the caller's frame,
    thread, process and multiprocessing names (the logging HOWTO's "Optimization" flags).
    Every log call, so every access line, went through structlog's frame walk for the caller
    and two getpid() calls: with them off an access line costs about half (docs/footprint.md).
    The JSON lines are unchanged: they render the event dict, never these record fields."""
    logging._srcfile = None  # the documented off switch for the caller lookup
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


_native = structlog.get_logger("fedgate.native")


def _emit(handler: logging.StreamHandler[TextIO], record: native_logs.Record) -> None:
    described = native_logs.describe(record)
    if described is None:  # a JSON line already (a child process's): as it is
        assert isinstance(record, native_logs.JsonLine)
        handler.acquire()
        try:
            handler.stream.write(record.text + "\n")
            handler.flush()
        finally:
            handler.release()
        return
    level, event, fields = described
    _native.log(logging.getLevelNamesMapping()[level.upper()], event, **fields)
