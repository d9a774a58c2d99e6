"""structlog JSON logs for every fedgate process, stdlib logging routed through the same pipe.

One JSON object per line on stderr, with `component` and `cluster` bound once at start-up and
connection ids bound by the drivers. Nothing here ever formats a key: `Svid.__repr__` hides it.
In a long-running process whose stderr `fedgate.native_logs` captured, the handler writes to
the original stderr and what gRPC's C core writes comes back here as JSON too.
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
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )
    _skip_unused_record_fields()
    handler = logging.StreamHandler(native_logs.original_stderr() or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # grpc and aioquic are chatty at INFO about internals an operator cannot act on.
    logging.getLogger("quic").setLevel(logging.WARNING)
    logging.getLogger("grpc").setLevel(logging.WARNING)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(component=component)
    if cluster:
        structlog.contextvars.bind_contextvars(cluster=cluster)
    native_logs.start_emitting(lambda record: _emit(handler, record))


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
