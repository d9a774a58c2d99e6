"""What one access line costs through fedgate's log pipeline (a benchmark: prints).

    .venv/bin/python bench/access_log.py

`fedgate.logs.configure` as every process runs it, then a sidecar's access line (its fields as
`sidecar/observe.py` logs them) written to /dev/null, best of 7 rounds of 5,000 each: once with
stdlib logging's per-record caller, thread and process lookups back on (how it was), once as
configured (off), alternating. Both render the same JSON line (tests/fedgate/test_footprint.py).
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


def main() -> None:
    best = {True: float("inf"), False: float("inf")}
    n = 5000
    with open(os.devnull, "w") as devnull:
        sys.stderr = devnull
        logs.configure("sidecar", "east")
        log = structlog.get_logger("fedgate.sidecar").bind(hop="source-sidecar", conn="c/o1")
        for _ in range(7):  # alternating, best of each: the machine's load varies meanwhile
            for on in (True, False):
                lookups(on)
                start = time.perf_counter()
                for _ in range(n):
                    log.info("request", **FIELDS)
                best[on] = min(best[on], (time.perf_counter() - start) / n)
        sys.stderr = sys.__stderr__
    print(f"access line, lookups on (before): {best[True] * 1e6:6.1f} us")
    print(f"access line, lookups off (now):   {best[False] * 1e6:6.1f} us")


if __name__ == "__main__":
    main()
