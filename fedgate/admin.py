"""The admin port every fedgate process serves: /healthz, /readyz, /config, /metrics.

`/metrics` is prometheus_client's default registry (fedgate.metrics registers the control-plane
collectors, the data plane its request metrics). `pages` adds asynchronous GET pages (the
controller's topology page). A `metrics_only` state serves just /healthz, /readyz and
/metrics: what a gateway exposes on its WAN address for the controllers to scrape, without the
running config.

A deliberately tiny HTTP/1.1 server (GET, and POST for bodiless actions such as the GitOps
webhook `POST /sync`; one request per connection, bounded head): it is
an operator's window, not a data path, and must not pull a web framework into every process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import structlog

_log = structlog.get_logger("fedgate.admin")
MAX_HEAD = 4096


def _default_metrics() -> str:
    from fedgate.metrics import exposition

    return exposition()


Page = Callable[[str], Awaitable[tuple[int, bytes, str]]]  # (query) -> (status, body, type)


@dataclass
class AdminState:
    """What the admin port reports; the owning process fills the callbacks in."""

    ready: Callable[[], bool] = lambda: False
    config: Callable[[], dict[str, Any]] = dict
    metrics: Callable[[], str] = _default_metrics
    extra: dict[str, Callable[[], dict[str, Any]]] = field(default_factory=dict)
    # POST actions by path (no body is read): e.g. "sync" -> trigger a GitOps round now.
    actions: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = field(default_factory=dict)
    pages: dict[str, Page] = field(default_factory=dict)  # GET path (no "/") -> async page
    metrics_only: bool = False


def _response(status: int, body: bytes, content_type: str) -> bytes:
    reason = {200: "OK", 404: "Not Found", 400: "Bad Request", 503: "Service Unavailable"}
    # Date (RFC 9110 section 6.6.1): `fedgate check` compares it with its own clock.
    head = (
        f"HTTP/1.1 {status} {reason.get(status, '')}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nDate: {formatdate(usegmt=True)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def route(state: AdminState, path: str) -> tuple[int, bytes, str]:
    path = path.split("?", 1)[0]
    if state.metrics_only and path not in ("/healthz", "/readyz", "/metrics"):
        return 404, b"not found\n", "text/plain"
    if path == "/healthz":
        return 200, b"ok\n", "text/plain"
    if path == "/readyz":
        ok = state.ready()
        return (200 if ok else 503), (b"ready\n" if ok else b"not ready\n"), "text/plain"
    if path == "/config":
        return 200, json.dumps(state.config(), indent=2).encode() + b"\n", "application/json"
    if path == "/metrics":
        return 200, state.metrics().encode(), "text/plain; version=0.0.4"
    if path.lstrip("/") in state.extra:
        body = json.dumps(state.extra[path.lstrip("/")](), indent=2).encode() + b"\n"
        return 200, body, "application/json"
    return 404, b"not found\n", "text/plain"


def _page(state: AdminState, target: str) -> Page | None:
    return state.pages.get(target.split("?", 1)[0].lstrip("/"))


async def _handle(
    state: AdminState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        parts = head.split(b"\r\n", 1)[0].decode("ascii", "replace").split(" ")
        action = state.actions.get(parts[1].lstrip("/")) if len(parts) == 3 else None
        if len(parts) == 3 and parts[0] == "POST" and action is not None:
            body = json.dumps(await action(), indent=2).encode() + b"\n"
            writer.write(_response(200, body, "application/json"))
        elif len(parts) != 3 or parts[0] != "GET":
            writer.write(_response(400, b"GET, or POST to an action\n", "text/plain"))
        elif not state.metrics_only and (page := _page(state, parts[1])) is not None:
            status, body, ctype = await page(parts[1].partition("?")[2])
            writer.write(_response(status, body, ctype))
        else:
            status, body, ctype = route(state, parts[1])
            writer.write(_response(status, body, ctype))
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
        pass
    except Exception:  # an admin bug must never take the process down
        _log.exception("admin request failed")
    finally:
        writer.close()


async def serve(state: AdminState, host: str, port: int) -> asyncio.Server:
    server = await asyncio.start_server(
        lambda r, w: _handle(state, r, w), host, port, limit=MAX_HEAD, reuse_address=True
    )
    _log.info("admin serving", listen=f"{host}:{port}")
    return server
