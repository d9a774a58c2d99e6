"""structlog JSON logs for every fedgate process, stdlib logging routed through the same pipe.

One JSON object per line on stderr, with `component` and `cluster` bound once at start-up and
connection ids bound by the drivers. Nothing here ever formats a key: `Svid.__repr__` hides it.
"""

from __future__ import annotations

import logging
import sys

import structlog


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
    handler = logging.StreamHandler(sys.stderr)
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
