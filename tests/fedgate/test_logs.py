"""fedgate.logs writes our own lines straight to the stream, without stdlib logging's records:
each line must be the one the stdlib route rendered (same fields, same order, same stream), and
a level below the configured one must write nothing.

Each case runs a child interpreter (logging is process-wide): one configured by
`fedgate.logs.configure`, one by the stdlib round trip it replaced (kept here as the reference),
both logging the same lines."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What `fedgate.logs.configure` did before the direct writer: structlog -> stdlib LogRecord ->
# ProcessorFormatter -> StreamHandler.
_STDLIB_ROUTE = """
import logging, sys, structlog
shared = [
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
handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(structlog.stdlib.ProcessorFormatter(
    foreign_pre_chain=shared,
    processors=[
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(),
    ],
))
root = logging.getLogger()
root.handlers[:] = [handler]
root.setLevel("INFO")
structlog.contextvars.clear_contextvars()
structlog.contextvars.bind_contextvars(component="sidecar", cluster="east")
"""

_DIRECT_ROUTE = """
from fedgate import logs
logs.configure("sidecar", "east")
"""

# The lines: an access line as the source sidecar binds it, an inbound one, a refusal, a
# retry's fields, an exception with its traceback, a debug line (dropped at INFO), a line
# carrying an object whose repr hides a secret, a stdlib line from a library, an unnamed
# logger.
_LINES = """
import logging, structlog

class Key:
    def __repr__(self):
        return "Key(<redacted>)"

structlog.contextvars.bind_contextvars(pod="client-0")
log = structlog.get_logger("fedgate.sidecar").bind(hop="source-sidecar", conn="c/o1")
rlog = log.bind(req="r1", method="POST", path="/fp?q=\\"x\\"").bind(service="fp.demo", route="r")
rlog = rlog.bind(tries=2, dst_cluster="west", endpoint="10.2.0.10").bind(status=200)
rlog.info("http request", duration_ms=1.5, fault_delay_s=0.25)
log.warning("http request failed", status=503, reason="no route", detail="é ünïcode ✓")
log.info("http retry", attempt=1, backoff_s=0.025, ok=True, missing=None, ids=[1, 2], m={"a": 1})
log.debug("not shown at INFO", n=1)
log.info("secret kept out", key=Key())
try:
    raise ValueError("boom")
except ValueError:
    log.exception("handler failed", peer="10.0.0.1")
log.log(logging.WARNING, "by level", n=3)
logging.getLogger("grpc").warning("from %s", "grpc")
structlog.get_logger().info("unnamed")
"""


def _lines(route: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", route + _LINES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    return out.stderr.splitlines()


CONTEXT = ("component", "cluster", "pod")  # contextvars: their order varies from run to run


def _fields(line: str) -> tuple[list[tuple[str, object]], dict[str, object]]:
    """A line's fields in order, but the time, and its context variables (in any order)."""
    pairs: list[tuple[str, object]] = json.loads(line, object_pairs_hook=list)
    fields = [(k, v) for k, v in pairs if k not in CONTEXT and k != "timestamp"]
    if dict(fields).get("exception"):  # the two scripts' line numbers differ
        fields = [(k, re.sub(r"line \d+", "line N", str(v))) for k, v in fields]
    assert len(pairs) - len(fields) == sum(k in CONTEXT for k, _ in pairs) + 1, line
    return fields, {k: v for k, v in pairs if k in CONTEXT}


def test_direct_lines_are_the_stdlib_route_s_lines_field_for_field() -> None:
    direct, reference = _lines(_DIRECT_ROUTE), _lines(_STDLIB_ROUTE)
    # The same keys in the same order with the same values; the time differs, and where the
    # context variables go among the keys is not fixed (nor was it).
    assert [_fields(line) for line in direct] == [_fields(line) for line in reference]
    parsed = [json.loads(line) for line in direct]
    assert [p["event"] for p in parsed] == [
        "http request",
        "http request failed",
        "http retry",
        "secret kept out",
        "handler failed",
        "by level",
        "from grpc",
        "unnamed",
    ]
    access = parsed[0]
    access.pop("timestamp")
    assert access == {
        "hop": "source-sidecar",
        "conn": "c/o1",
        "req": "r1",
        "method": "POST",
        "path": '/fp?q="x"',
        "service": "fp.demo",
        "route": "r",
        "tries": 2,
        "dst_cluster": "west",
        "endpoint": "10.2.0.10",
        "status": 200,
        "duration_ms": 1.5,
        "fault_delay_s": 0.25,
        "event": "http request",
        "component": "sidecar",
        "cluster": "east",
        "pod": "client-0",
        "level": "info",
        "logger": "fedgate.sidecar",
    }
    assert parsed[3]["key"] == "Key(<redacted>)"
    failed = parsed[4]
    assert failed["level"] == "error"
    assert "ValueError: boom" in failed["exception"]
    assert parsed[5]["level"] == "warning"
    assert parsed[7]["logger"] == "__main__"  # the caller's module, as stdlib's factory names it
