"""Forwarding one HTTP/1.1 request: the protocol layer of `sidecar.http.exchange`'s try loop.

Which target each try goes to, its deadline, retries, outlier reports and mirror targets are
the request-attempt core's (`sidecar.traffic.attempt`); the loop that drives it is
`sidecar.http.exchange.Exchanger`. This layer moves the bytes: a try on a pooled inner mTLS
connection (`sidecar.http.pool`) under the connection-pool limits and the try's deadline (a
reused connection that ends before one byte of a response is an unprocessed try, which the
core replays on a new connection),
the response head, a retried response's body discarded, and the final response streamed back
with backpressure under the overall timeout.

Every failure the sidecar answers itself carries `x-fedgate-reason` and is logged with the same
reason: 503 `max requests` / `pending overflow` (limits), `no route`, `upstream connect
failure`, `upstream reset`; 502 `bad upstream response`; 504 `upstream timeout`. A failure
after the response head went out resets the app's connection (a short body is worse than an
error). A 101 Switching Protocols (e.g. WebSocket) leaves HTTP: both connections are spliced.
Mirrors are copies of replayable requests only, `-shadow` appended to their Host (Envoy's
convention).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from sidecar.errors import ProxyError, UnprocessedError
from sidecar.http.body import RequestBody, next_event, read_more
from sidecar.http.codec import (
    CHUNKED,
    UNTIL_CLOSE,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Framing,
    HttpProtocolError,
    NeedData,
    Reader,
    Request,
    Response,
)
from sidecar.http.encode import (
    LAST_CHUNK,
    encode_chunk,
    encode_request,
    encode_response,
    local_response,
)
from sidecar.http.exchange import Exchange, Exchanger, try_failure
from sidecar.http.flow import FlowConn
from sidecar.http.pool import Upstream, UpstreamPool
from sidecar.pipe import relay
from sidecar.traffic.attempt import Answer, Answered, Attempts, Failure
from sidecar.traffic.balance import Target
from sidecar.traffic.record import RequestRecord
from sidecar.traffic.retry import RESET, Outcome

DISCARD_LIMIT = 64 * 1024  # a retried response's body is read and dropped up to this, else closed
DISCARD_TIMEOUT = 2.0


@dataclass(eq=False, slots=True)
class Call(Exchange):
    req: Request  # as forwarded (Expect handled)
    app: FlowConn
    body: RequestBody
    fresh: bool = False  # a reused connection was stale: the next try opens a new one


@dataclass(frozen=True, slots=True)
class _Got:
    up: Upstream
    resp: Response
    reader: Reader


class Forwarder(Exchanger[Call, _Got, UpstreamPool]):
    """Sends requests upstream for an `HttpProxy` (which owns the pool and the counters)."""

    TASKS = "sidecar-http-mirror"
    LOCAL_ANSWERS = "local_replies"

    async def local(
        self,
        app: FlowConn,
        req: Request,
        body: RequestBody,
        log: Any,
        answer: Answer,
        record: RequestRecord | None = None,
    ) -> bool:
        """Answer the app ourselves (reason in `x-fedgate-reason`); keep the connection only if
        the request was read whole."""
        self._refusal(log, record, answer)
        keep = req.keep_alive and (body.complete or await body.discard(DISCARD_LIMIT))
        app.write(local_response(answer.status, answer.reason, answer.detail, close=not keep))
        return keep

    # -- the layer ----------------------------------------------------------------------------

    def mirror(self, call: Call, attempts: Attempts) -> None:
        if not call.body.complete:
            self.stats["mirrors_skipped"] += 1  # the body streams: it cannot be sent twice
            return
        super().mirror(call, attempts)

    def _shadow(self, call: Call) -> Call:
        req = replace(call.req, headers=_shadow_host(call.req.headers))
        return replace(call, req=req, log=call.log.bind(mirror=True), record=None)

    def _replayable(self, call: Call) -> bool:
        return call.body.complete and not call.body.streamed  # read ahead whole, never streamed

    async def _answer(self, call: Call, answer: Answer) -> bool:
        return await self.local(call.app, call.req, call.body, call.log, answer, call.record)

    def _judge(self, got: _Got) -> Answered:
        return Answered(got.resp.status)

    async def _attempt(self, call: Call, target: Target, deadline: float | None) -> _Got | Failure:
        """One try: a connection, the request, the response head. Upstream failures are
        returned as a `Failure`; an app failure while streaming the request body raises."""
        setup = self._setup(call, target)
        if isinstance(setup, Failure):
            return setup
        state, svc = call.state, call.runtime.pool
        traced = call.span is not None
        head = b"" if traced else encode_request(call.req, call.body.out_framing)
        phase = "connect"
        up: Upstream | None = None
        got_out = False
        reader = Reader("response")
        try:
            async with asyncio.timeout_at(deadline):
                allowed = setup.decision.identities.__contains__
                up, reused = await self.pool.acquire(
                    svc, setup.key, allowed, state.svid, setup.dial, fresh=call.fresh
                )
                phase = "request"
                if traced:
                    tp = setup.dial.traceparent if reused else setup.dial.next_span()
                    head = encode_request(call.req, call.body.out_framing, tp)
                try:
                    await call.body.send(up.conn, head)
                    phase = "response"
                    resp = await self._response_head(up.conn, call.req, reader)
                except (ProxyError, HttpProtocolError) as e:
                    if reused and reader.untouched and not _failed(call.body.app):
                        # A pooled connection that closed (or was reset) before one byte of
                        # a response: the server closed it while idle, racing our request,
                        # which it never read. Replayed on a new connection (the core's
                        # REFUSED), whatever the method, as Chromium does.
                        self.stats["stale_connections"] += 1
                        call.fresh = True
                        raise UnprocessedError("stale pooled connection", str(e)) from e
                    raise
                got = _Got(up, resp, reader)
                up, got_out = None, True
                return got  # the request stays counted until the response is done
        except HttpProtocolError as e:
            if phase == "request":
                raise  # only the app's streamed body is parsed while sending the request
            return Failure(Outcome(RESET), 502, "bad upstream response", e.detail)
        except (TimeoutError, ProxyError) as e:
            mid_body = phase == "request" and call.body.streamed and _failed(call.body.app)
            if isinstance(e, ProxyError) and mid_body:
                raise  # the app went away mid-body: nothing to answer
            return try_failure(e, phase, call.eff)
        finally:
            if up is not None:
                self.pool.discard(svc, up)
            if not got_out:
                svc.budget.end_request()

    async def _response_head(self, conn: FlowConn, req: Request, reader: Reader) -> Response:
        reader.expect(req.method)
        while True:
            event = await next_event(conn, reader)
            match event:
                case Response(status=status) if status < 200:
                    if status == 101 and req.upgrade:
                        return event
                    continue  # 100, 102, 103: interim, dropped (we answered 100 ourselves)
                case Response():
                    return event
                case ConnectionClosed():
                    raise ProxyError("upstream closed", "the connection ended before a response")
                case _:
                    raise AssertionError(f"unexpected {event!r} before a response")

    async def _drop(self, call: Call, got: _Got) -> None:
        """Drop a response we will retry; keep its connection if that is cheap."""
        svc = call.runtime.pool
        try:
            async with asyncio.timeout(DISCARD_TIMEOUT):
                dropped = 0
                while not isinstance(
                    event := await next_event(got.up.conn, got.reader), EndOfMessage
                ):
                    if isinstance(event, Data):
                        dropped += len(event.data)
                        if dropped > DISCARD_LIMIT:
                            raise ProxyError("too large", "response body to discard")
        except (TimeoutError, ProxyError, HttpProtocolError):
            self.pool.discard(svc, got.up)
        else:
            self.pool.release(svc, got.up, _reusable(got))
        finally:
            svc.budget.end_request()

    async def _respond(self, call: Call, got: _Got, deadline: float | None) -> bool:
        """Stream the final response to the app; whether the app connection may continue."""
        app, svc, resp, reader, up = call.app, call.runtime.pool, got.resp, got.reader, got.up
        call.log = call.log.bind(status=resp.status)
        seen = call.record
        if seen is not None:
            seen.status = resp.status
        try:
            if resp.status == 101:
                return await self._upgrade(call, got)
            framing = reader.framing
            version = call.req.version
            out: Framing = framing
            if framing.kind == "close" or (framing.kind == "chunked" and version == "1.0"):
                out = CHUNKED if version == "1.1" else UNTIL_CLOSE
            keep = call.req.keep_alive and out.kind != "close" and call.body.complete
            try:
                async with asyncio.timeout_at(deadline):
                    await _stream(
                        app,
                        up.conn,
                        reader,
                        out,
                        [encode_response(resp, out, close=not keep)],
                        seen,
                    )
            except (TimeoutError, ProxyError, HttpProtocolError) as e:
                self.pool.discard(svc, up)
                why = "response timeout" if isinstance(e, TimeoutError) else "response failed"
                call.log.warning("http request failed", reason=why, detail=str(e) or why)
                if seen is not None:
                    seen.reason = why
                self.stats["failed"] += 1
                app.reset()  # the head went out: only a reset tells the app it is incomplete
                return False
            self.pool.release(svc, up, _reusable(got))
            return keep
        finally:
            svc.budget.end_request()

    async def _upgrade(self, call: Call, got: _Got) -> bool:
        """101 Switching Protocols: forward it, then splice both connections until they end."""
        app, svc, up = call.app, call.runtime.pool, got.up
        app.write(encode_response(got.resp, Framing("none")))
        rest = got.reader.take_buffer()
        if rest:
            app.write(rest)
        pending = call.body.reader.take_buffer()
        if pending:
            up.conn.write(pending)
        self.pool.detach(svc, up)
        call.log.info("http upgraded", upgrade=got.resp.get("upgrade") or "")
        error = await relay(app, up.conn)
        self.pool.forget(up)
        if error is not None:
            call.log.info("http upgraded connection ended", reason=error.reason)
        return False


async def _stream(
    app: FlowConn,
    upstream: FlowConn,
    reader: Reader,
    out: Framing,
    pending: list[bytes],
    seen: RequestRecord | None,
) -> None:
    """Send `pending` (the response head) and the body to the app. What has arrived goes out
    in one write whenever the upstream is to be waited for, and when the message ends: a small
    body that came with its head leaves with it as one send; nothing waits for more bytes.
    What is pending when a failure ends the response still goes out (as when every part was
    written on its own)."""
    try:
        while True:
            event = reader.next_event()
            if isinstance(event, NeedData):
                if pending:
                    app.writelines(pending)
                    pending = []
                await app.drain()
                await read_more(upstream, reader)
                continue
            if isinstance(event, EndOfMessage):
                if out is CHUNKED:
                    pending.append(LAST_CHUNK)
                return
            assert isinstance(event, Data), event
            if seen is not None:
                seen.response_bytes += len(event.data)
            pending.append(encode_chunk(event.data) if out is CHUNKED else event.data)
    finally:
        if pending:
            app.writelines(pending)


def _failed(conn: FlowConn) -> bool:
    return conn.error is not None or conn.closed.done()


def _address(target: Target) -> str:
    return target.endpoint.address if target.endpoint is not None else ""


def _reusable(got: _Got) -> bool:
    return got.resp.keep_alive and got.reader.framing.kind != "close" and got.reader.buffered == 0


def _shadow_host(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Envoy's convention: a mirrored request's authority gets `-shadow` appended."""
    out = []
    for k, v in headers:
        if k.lower() == "host":
            host, colon, port = v.rpartition(":") if v.count(":") == 1 else (v, "", "")
            v = f"{host}-shadow{colon}{port}"
        out.append((k, v))
    return tuple(out)
