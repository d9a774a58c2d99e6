"""What one access line costs through fedgate's log pipeline (a benchmark: prints).

    .venv/bin/python bench/access_log.py

A sidecar's access line (its fields as `sidecar/observe.py` logs them) written to /dev/null,
best of 7 rounds of 5,000 each, three ways, alternating (the machine's load varies meanwhile):

- `stdlib route, lookups on`: structlog -> a stdlib `LogRecord` -> `ProcessorFormatter` ->
  `StreamHandler`, with stdlib logging's per-record caller, thread and process lookups (how
  every line was written at first);
- `stdlib route, lookups off`: the same without the lookups (`fedgate.logs` turned them off);
- `direct (fedgate.logs now)`: `fedgate.logs.configure` as every process runs it: structlog
  renders and writes the line itself.

All three render the same JSON line (tests/fedgate/test_logs.py).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog

from fedgate import logs

FIELDS = {
    "service": "fp.demo",
    "port": 9090,
    "method": "POST",
    "path": "/fp",
    "status": 200,
    "attempts": 1,
    "destination_cluster": "west",
    "bytes_received": 1024,
    "bytes_sent": 300,
    "duration_s": 0.0012,
    "upstream": "10.2.0.10:15006",
}


def lookups(on: bool) -> None:
    logging._srcfile = os.path.normcase(logging.addLevelName.__code__.co_filename) if on else None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = on


def stdlib_route(stream: object) -> None:
    """How `fedgate.logs.configure` routed structlog's lines before the direct writer."""
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
    handler = logging.StreamHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    logging.getLogger().handlers[:] = [handler]


def main() -> None:
    ways = ("stdlib route, lookups on", "stdlib route, lookups off", "direct (fedgate.logs now)")
    best = dict.fromkeys(ways, float("inf"))
    n = 5000
    with open(os.devnull, "w") as devnull:
        sys.stderr = devnull
        for _ in range(7):
            for way in ways:
                logs.configure("sidecar", "east")  # the lookups off, the direct writer
                if way.startswith("stdlib"):
                    stdlib_route(devnull)
                    lookups(way.endswith("on"))
                log = structlog.get_logger("fedgate.sidecar").bind(hop="source-sidecar", conn="c")
                start = time.perf_counter()
                for _ in range(n):
                    log.info("request", **FIELDS)
                best[way] = min(best[way], (time.perf_counter() - start) / n)
        sys.stderr = sys.__stderr__
    for way in ways:
        print(f"access line, {way + ':':28s} {best[way] * 1e6:6.1f} us")


if __name__ == "__main__":
    main()
