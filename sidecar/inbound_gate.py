"""Per-request authorization on an inbound connection: the drivers around `mesh.authz`.

The destination sidecar (`sidecar.inbound`) splices an inbound stream to the app when its
service has no AuthorizationPolicy. When it has some and the port's protocol is HTTP, HTTP2 or
GRPC, every request is decided on its own (Istio enforces L7 policy per request too): `serve`
sniffs the caller's first bytes (`sidecar.sniff`) and then

- HTTP/1.1: `sidecar.http.gate.H1Gate` lets the raw bytes of admitted requests through and
  stops at the first refused one, which is answered `403` with `x-fedgate-reason` (after the
  responses before it) and closes the connection;
- HTTP/2 (gRPC included): the connection is terminated on both sides (`sidecar.http2.conn`):
  each caller stream is decided, a refused one is answered `403` (gRPC: Trailers-Only with
  `PERMISSION_DENIED`) and an admitted one is opened on one HTTP/2 connection to the app and
  its events flow both ways with flow control;
- anything else: the call is decided without HTTP fields (fail closed, `mesh.authz`) and
  relayed or refused whole.

Every refusal is reported through `refused(reason, method, path)` (the inbound logs the access
line and counts the metric). What this module does not do: choose when a gate is needed,
verify identities, or touch the app's responses beyond passing them on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from mesh.authz import AuthzDecision
from mesh.tasks import TaskSet
from sidecar.errors import ProxyError, UnprocessedError
from sidecar.http.codec import HttpProtocolError, Request
from sidecar.http.encode import local_response
from sidecar.http.flow import FlowConn
from sidecar.http.gate import H1Gate
from sidecar.http2 import grpc
from sidecar.http2.conn import LOST, H2Conn, serve_streams
from sidecar.http2.messages import local_answer
from sidecar.http2.session import (
    REFUSED_STREAM,
    Data,
    Ended,
    Headers,
    Reset,
    Trailers,
)
from sidecar.pipe import relay
from sidecar.sniff import H2, HTTP1, OPAQUE, first_bytes

# (method, path) -> decision; (None, None) for a call that is not HTTP
Decide = Callable[[str | None, str | None], AuthzDecision]
Refused = Callable[[AuthzDecision, str, str], None]


async def _sniff(caller: FlowConn) -> str:
    """`HTTP1`, `H2` or `OPAQUE` from the caller's first bytes (they stay buffered)."""
    caller.resume_reading()
    try:
        return await caller.read_frame(first_bytes, "first bytes")
    except ProxyError:
        if caller.eof and caller.error is None:
            return OPAQUE  # ended before a verdict: nothing to decide per request
        raise


async def serve(
    caller: FlowConn, app: FlowConn, decide: Decide, refused: Refused, log: Any
) -> ProxyError | None:
    """Serve the connection until it ends; the first error, if any."""
    try:
        kind = await _sniff(caller)
    except ProxyError as e:
        return e
    if kind == HTTP1:
        return await _serve_h1(caller, app, decide, refused)
    if kind == H2:
        return await _serve_h2(caller, app, decide, refused, log)
    decision = decide(None, None)
    if not decision.allowed:
        refused(decision, "", "")
        caller.reset()
        app.reset()
        return ProxyError("denied", decision.reason)
    return await relay(caller, app)


# -- HTTP/1.1 ----------------------------------------------------------------------------------


async def _serve_h1(
    caller: FlowConn, app: FlowConn, decide: Decide, refused: Refused
) -> ProxyError | None:
    def decide_request(req: Request) -> AuthzDecision:
        return decide(req.method, req.target)

    gate = H1Gate(decide_request)
    answered = False

    def answer_if_due() -> None:
        nonlocal answered
        if gate.refused is None or answered or not gate.refusal_due:
            return
        answered = True
        req, decision = gate.refused
        refused(decision, req.method, req.target)
        detail = f"{req.method} {req.target}"
        caller.write(local_response(403, decision.reason, detail, close=True))
        caller.write_eof()
        app.reset_if_open()

    async def upstream() -> None:
        try:
            while gate.refused is None:
                data = await caller.read_some()
                if not data:
                    app.write_eof()
                    return
                out = gate.from_caller(data)
                if out:
                    caller.relayed += len(out)
                    if caller.tap is not None:
                        caller.tap(out)  # telemetry sees what the app sees
                    app.write(out)
                    await app.drain()
        except HttpProtocolError as e:
            caller.write(local_response(e.status, "malformed request", e.detail, close=True))
            caller.write_eof()
            app.reset_if_open()
            return
        answer_if_due()

    async def downstream() -> None:
        while True:
            data = await app.read_some()
            if not data:
                if not answered:
                    caller.write_eof()
                return
            try:
                release = gate.from_app(data)
            except HttpProtocolError:
                release = b""
            app.relayed += len(data)
            if app.tap is not None:
                app.tap(data)
            caller.write(data)
            await caller.drain()
            if release:
                app.write(release)
            answer_if_due()
            if answered:
                return

    try:
        await asyncio.gather(upstream(), downstream())
    except ProxyError as e:
        caller.reset_if_open()
        app.reset_if_open()
        return e
    await _closed(caller)
    app.reset_if_open() if answered else await _closed(app)
    return None


async def _closed(conn: FlowConn) -> None:
    """Both directions ended: close (the peer's EOF came; ours went)."""
    if not conn.closed.done():
        conn.close()
    await conn.closed


# -- HTTP/2 ------------------------------------------------------------------------------------


async def _serve_h2(
    caller: FlowConn, app: FlowConn, decide: Decide, refused: Refused, log: Any
) -> ProxyError | None:
    tasks = TaskSet("sidecar-inbound-h2")
    up = H2Conn(app, client=True)
    up.start()
    up_task = tasks.spawn(up.run(), "h2-app")

    def handle(down: H2Conn, sid: int, head: Headers) -> Coroutine[Any, Any, None]:
        return _h2_stream(down, up, sid, head, decide, refused)

    try:
        down = await serve_streams(caller, handle, "sidecar-inbound-h2")
    finally:
        up.close("caller gone")
        up_task.cancel()
        await tasks.aclose()
        caller.reset_if_open()
        app.reset_if_open()
    if down.error is not None:
        log.info("http2 connection ended", reason=down.error.reason, detail=down.error.detail)
    return down.error


def _field(fields: tuple[tuple[str, str], ...], name: str) -> str:
    return next((v for k, v in fields if k == name), "")


async def _h2_stream(
    down: H2Conn, up: H2Conn, sid: int, head: Headers, decide: Decide, refused: Refused
) -> None:
    method, path = _field(head.headers, ":method"), _field(head.headers, ":path")
    decision = decide(method, path)
    if not decision.allowed:
        refused(decision, method, path)
        is_grpc = grpc.is_grpc(_field(head.headers, "content-type"))
        answer = local_answer(403, decision.reason, f"{method} {path}", is_grpc)
        try:
            down.send_headers(sid, answer.fields, end=not answer.body)
            if answer.body:
                await down.send_data(sid, answer.body, end=True)
        except ProxyError:
            pass
        down.release(sid, early=not head.end)
        return
    usid = 0
    ok = unprocessed = False
    try:
        usid = up.open(head.headers, end=head.end)
        sender = None if head.end else asyncio.create_task(_pipe(down, sid, up, usid))
        try:
            first = await up.next(usid)
            if isinstance(first, Reset) and first.code == REFUSED_STREAM:
                raise UnprocessedError("upstream refused stream", "the app never processed it")
            if not isinstance(first, Headers):
                raise ProxyError("upstream reset", f"before a response: {first!r}")
            down.send_headers(sid, first.headers, end=first.end)
            if not first.end:
                await _pipe(up, usid, down, sid)
            ok = True
        finally:
            if sender is not None and not sender.done():
                sender.cancel()
    except UnprocessedError:
        # The app's connection is going away (its GOAWAY) or gone, and this request never
        # reached it: refuse the stream so the source sidecar replays it, and go away too, so
        # the source opens a new connection (and this one, a new app connection).
        unprocessed = True
    except ProxyError:
        pass
    finally:
        if usid:
            up.release(usid, reset=not ok)
        down.release(sid, reset=not ok, refused=unprocessed)
        if unprocessed:
            down.drain("the app's connection is going away")


async def _pipe(src: H2Conn, ssid: int, dst: H2Conn, dsid: int) -> None:
    """Move one stream's body and end (data, trailers, reset) from `src` to `dst`."""
    while True:
        event = await src.next(ssid)
        match event:
            case Data(data=data, flow=flow, end=end):
                if data or end:
                    await dst.send_data(dsid, data, end=end)
                src.ack(ssid, flow)
                if end:
                    return
            case Trailers(headers=headers):
                dst.send_headers(dsid, headers, end=True)
                return
            case Ended():
                dst.end_stream(dsid)
                return
            case Reset(code=code):
                dst.reset(dsid)
                what = "connection lost" if code == LOST else f"stream reset ({code})"
                raise ProxyError("stream reset", what)
            case Headers():
                raise ProxyError("malformed message", "HEADERS inside a body")
