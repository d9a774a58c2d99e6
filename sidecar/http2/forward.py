"""Forwarding one HTTP/2 stream: the protocol layer of `sidecar.http.exchange`'s try loop.

Which target each try goes to, its deadline, retries, outlier reports and mirror targets are
the request-attempt core's (`sidecar.traffic.attempt`), as for HTTP/1.1, on the same
per-service runtime (`ServiceRuntime`: limits and outlier state are shared with HTTP/1.1
traffic to the service port). This layer moves the bytes: each try opens a stream on a pooled
upstream connection (`sidecar.http2.pool`), sends the request head (with the source span's
`traceparent`, or the remote ingress's on a connection the try opened), and sends the body in
a task of its own while the response head is awaited (a streaming call may need answers before
it sends more). A response is judged by its status, or for a gRPC Trailers-Only answer by its
`grpc-status` (`unavailable` etc. in `retryOn`; UNAVAILABLE counts as a 503 for outlier
detection). The final response streams back with flow control both ways; trailers pass through.

Failures the sidecar answers itself carry `x-fedgate-reason` (to gRPC clients, a grpc-status
and grpc-message naming the reason); after the response head went out, a gRPC call ends with
failure trailers and any other request with a stream reset.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from sidecar.errors import ProxyError, UnprocessedError
from sidecar.http.exchange import Exchange, Exchanger, timeout_detail, try_failure
from sidecar.http2.body import StreamBody
from sidecar.http2.conn import LOST, H2Conn
from sidecar.http2.grpc import parse_status
from sidecar.http2.messages import (
    MessageError,
    Request,
    Response,
    failure_trailers,
    local_answer,
    parse_response,
)
from sidecar.http2.pool import H2Pool, H2Upstream
from sidecar.http2.session import REFUSED_STREAM, Data, Ended, Headers, Reset, Trailers
from sidecar.traffic.attempt import Answer, Answered, Failure
from sidecar.traffic.balance import Target
from sidecar.traffic.record import RequestRecord
from sidecar.traffic.retry import RESET, Outcome


@dataclass(eq=False, slots=True)
class H2Call(Exchange):
    req: Request
    app: H2Conn
    sid: int  # the app's stream
    body: StreamBody
    drive: bool = True  # reads the app's body (False for a mirror: it follows the primary)


@dataclass(frozen=True, slots=True)
class _Got:
    up: H2Upstream
    sid: int
    resp: Response
    sender: asyncio.Task[None] | None


class H2Forwarder(Exchanger[H2Call, _Got, H2Pool]):
    TASKS = "sidecar-h2-forward"

    async def local(
        self,
        app: H2Conn,
        sid: int,
        grpc: bool,
        log: Any,
        answer: Answer,
        record: RequestRecord | None = None,
    ) -> bool:
        """Answer the app's stream ourselves; whether the answer went out."""
        self._refusal(log, record, answer)
        out = local_answer(answer.status, answer.reason, answer.detail, grpc)
        try:
            app.send_headers(sid, out.fields, end=not out.body)
            if out.body:
                await app.send_data(sid, out.body, end=True)
        except ProxyError:
            return False
        return True

    # -- the layer ----------------------------------------------------------------------------

    def _judge(self, got: _Got) -> Answered:
        return Answered(got.resp.status, got.resp.grpc_status)

    def _replayable(self, call: H2Call) -> bool:
        return call.body.replayable

    def _shadow(self, call: H2Call) -> H2Call:
        log = call.log.bind(mirror=True)
        return replace(call, req=call.req.shadow(), log=log, drive=False, record=None)

    async def _answer(self, call: H2Call, answer: Answer) -> bool:
        grpc_call = call.req.grpc
        return await self.local(call.app, call.sid, grpc_call, call.log, answer, call.record)

    async def _attempt(
        self, call: H2Call, target: Target, deadline: float | None
    ) -> _Got | Failure:
        """One try: a stream, the request, the response head. Upstream failures become
        `Failure` with the outcome retries and outlier detection judge."""
        setup = self._setup(call, target)
        if isinstance(setup, Failure):
            return setup
        budget = call.runtime.pool.budget
        phase = "connect"
        up: H2Upstream | None = None
        sid = 0
        sender: asyncio.Task[None] | None = None
        handed_over = False
        try:
            async with asyncio.timeout_at(deadline):
                allowed = setup.decision.identities.__contains__
                up = await self.pool.acquire(
                    budget, setup.key, allowed, call.state.svid, setup.dial
                )
                phase = "request"
                if call.drive:
                    call.body.take_ready()
                fields = call.req.fields(setup.dial.next_span())
                sid = up.h2.open(fields, end=call.body.empty)
                if call.body.replayable and not call.body.empty:
                    await _send_body(call.body, up.h2, sid, drive=False)  # all here: no task
                elif not call.body.empty:
                    sender = self._tasks.spawn(
                        _send_body(call.body, up.h2, sid, call.drive), f"h2-body-{sid}"
                    )
                phase = "response"
                resp = await _response_head(up.h2, sid)
                handed_over = True
                return _Got(up, sid, resp, sender)  # the request stays counted until the end
        except MessageError as e:
            return Failure(Outcome(RESET), 502, "bad upstream response", str(e))
        except (TimeoutError, ProxyError) as e:
            return try_failure(e, phase, call.eff)
        finally:
            if not handed_over:
                if sender is not None:
                    sender.cancel()
                if up is not None and sid:
                    up.h2.release(sid, reset=True)
                budget.end_request()

    async def _drop(self, call: H2Call, got: _Got) -> None:
        """Abandon a response (resetting a stream is cheap in HTTP/2)."""
        if got.sender is not None:
            got.sender.cancel()
        got.up.h2.release(got.sid, reset=True)
        call.runtime.pool.budget.end_request()

    async def _respond(self, call: H2Call, got: _Got, deadline: float | None) -> bool:
        """Stream the final response to the app; whether it ended cleanly."""
        app, asid, up, usid = call.app, call.sid, got.up.h2, got.sid
        call.log = call.log.bind(status=got.resp.status)
        record = call.record
        if got.resp.grpc_status is not None:
            call.log = call.log.bind(grpc_status=got.resp.grpc_status)
        head_sent = False
        try:
            async with asyncio.timeout_at(deadline):
                app.send_headers(asid, got.resp.fields, end=got.resp.end)
                head_sent = True
                ended = got.resp.end
                while not ended:
                    event = await up.next(usid)
                    match event:
                        case Data(data=data, flow=flow, end=end):
                            if data or end:
                                await app.send_data(asid, data, end=end)
                            if record is not None:
                                record.response_bytes += len(data)
                            up.ack(usid, flow)
                            ended = end
                        case Trailers(headers=headers):
                            app.send_headers(asid, headers, end=True)
                            ended = True
                            if record is not None:  # a gRPC call's status comes last
                                status = next((v for k, v in headers if k == "grpc-status"), None)
                                record.grpc_status = parse_status(status)
                        case Ended():
                            app.end_stream(asid)
                            ended = True
                        case Reset(code=code):
                            what = "connection lost" if code == LOST else f"stream reset ({code})"
                            raise ProxyError("upstream reset", f"response: {what}")
                        case Headers():
                            raise ProxyError("bad upstream response", "HEADERS inside the body")
        except (TimeoutError, ProxyError) as e:
            up.release(usid, reset=True)
            timeout = isinstance(e, TimeoutError)
            reason = "upstream timeout" if timeout else getattr(e, "reason", "upstream reset")
            detail = timeout_detail(call.eff, "response") if timeout else str(e)
            self.stats["failed"] += 1
            call.log.warning("http request failed", reason=reason, detail=detail)
            if record is not None:
                record.reason = reason
            if not head_sent:
                return await self._answer(call, Answer(504, reason, detail))
            if call.req.grpc:
                try:
                    app.send_headers(asid, failure_trailers(reason, detail), end=True)
                    return True
                except ProxyError:
                    pass
            app.reset(asid)
            return False
        finally:
            if got.sender is not None and not got.sender.done():
                got.sender.cancel()  # answered before the request ended: stop sending it
            call.runtime.pool.budget.end_request()
        early = got.sender is not None and not call.body.complete
        up.release(usid, early=early)
        return True


async def _send_body(body: StreamBody, h2: H2Conn, sid: int, drive: bool) -> None:
    """Send the request body on `sid` (as it arrives, or replayed); on failure reset the
    stream so the try waiting for the response sees it."""
    try:
        i = 0
        while (chunk := await body.get(i, drive)) is not None:
            await h2.send_data(sid, chunk)
            i += 1
        if body.trailers is not None:
            h2.send_headers(sid, body.trailers, end=True)
        else:
            h2.end_stream(sid)
    except ProxyError:
        h2.reset(sid)


async def _response_head(h2: H2Conn, sid: int) -> Response:
    event = await h2.next(sid)
    match event:
        case Headers(headers=fields, end=end):
            return parse_response(fields, end)
        case Reset(code=code) if code == REFUSED_STREAM:
            # Refused, or above a GOAWAY's last-stream-id: never processed (RFC 9113 §8.7).
            raise UnprocessedError("upstream reset", "before a response: stream refused")
        case Reset(code=code):
            what = "connection lost" if code == LOST else f"stream reset ({code})"
            raise ProxyError("upstream reset", f"before a response: {what}")
        case _:
            raise MessageError(f"{type(event).__name__} before the response head")
