"""The driver loop of one request's tries, shared by the HTTP/1.1 and HTTP/2 forwarders.

`Exchanger.forward` drives the request-attempt core (`sidecar.traffic.attempt.Attempts`): it
asks for a try, runs it on the protocol layer (a subclass: `sidecar.http.forward.Forwarder`,
`sidecar.http2.forward.H2Forwarder`), reports the result with `now`, and does what the core
says: drop the response and retry after the backoff (a `retry` span event, an `http retry`
line), stream the response, or answer locally. Outlier ejections the core reports are logged
and counted here. `Exchanger.mirror` sends a fire-and-forget copy (bounded in number, response
discarded) to where the core says.

The layer is a handful of methods (`_attempt`, `_judge`, `_drop`, `_respond`, `_answer`,
`_shadow`): what differs between HTTP/1.1 and HTTP/2 is how bytes move, never which try goes
where. A new retry rule (a stream the server never processed, a stale pooled connection) is a
new `Failure` outcome judged by the core, not a change to either layer. `now` is the event
loop's clock (asyncio's and uvloop's are CLOCK_MONOTONIC, the scale of `time.monotonic`, which
outlier status and TCP results use). What this module does not do: pools, codecs, telemetry
of the whole request (`sidecar.observe`).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from mesh.errors import NoRouteError
from mesh.naming import SpiffeId
from mesh.tasks import TaskSet
from mesh.telemetry import Span
from sidecar.errors import ProxyError, UnprocessedError
from sidecar.http.flow import FlowConn
from sidecar.http.pool import PoolKey, PoolRefusedError, ServicePool
from sidecar.observe import log_outlier_events
from sidecar.pipe import Conn
from sidecar.routes import Decision, ServiceRoute
from sidecar.state import ProxyState
from sidecar.traffic.attempt import Answer, Answered, Attempts, Failure, Respond, Retry
from sidecar.traffic.balance import Target
from sidecar.traffic.match import Effective
from sidecar.traffic.outlier import OutlierDetector
from sidecar.traffic.peers import PeerHealth
from sidecar.traffic.record import RequestRecord
from sidecar.traffic.retry import CONNECT_FAILURE, LOCAL, REFUSED, RESET, TIMEOUT, Outcome

MAX_MIRRORS = 64  # mirrored requests in flight per sidecar; beyond, a mirror is dropped (counted)


@dataclass(frozen=True, slots=True)
class Dialed:
    """A mesh connection ready for a request (what `MeshConnect` returns)."""

    conn: Conn
    peer: SpiffeId  # the destination sidecar's verified identity
    via: str = ""  # traceparent of the remote ingress's span (a try that opened a tunnel)
    tls_resumed: bool = False
    smux: str = ""  # a stream of this pooled multiplexed connection (TCP calls)


# (route, decision, state, traceparent of the calling span or "") -> a ready connection
MeshConnect = Callable[[ServiceRoute, Decision, ProxyState, str], Awaitable[Dialed]]


@dataclass(eq=False, slots=True)
class ServiceRuntime:
    """What outlives one snapshot for a service port: its pool and its outlier state."""

    pool: ServicePool
    outlier: OutlierDetector | None = None


@dataclass(eq=False, slots=True, kw_only=True)
class Exchange:
    """What every layer's call carries (`Call`, `H2Call` add their own): the request's route,
    config snapshot, effective policy, the service port's runtime, its log, and its telemetry."""

    route: ServiceRoute
    state: ProxyState
    eff: Effective
    runtime: ServiceRuntime
    log: Any
    span: Span | None = None  # the request's span (tracing on)
    record: RequestRecord | None = None  # what telemetry reports (tracing or metrics on)


C = TypeVar("C", bound=Exchange)
G = TypeVar("G")  # a layer's try that got a response head
P = TypeVar("P")  # a layer's connection pool


class Dial:
    """Opens a connection for one try's pool (`MeshConnect`), keeping what the tunnel said."""

    def __init__(self, connect: MeshConnect, call: Exchange, decision: Decision) -> None:
        self._connect = connect
        self._call = call
        self._decision = decision
        # The request's span (tracing on): the CONNECT carries it.
        self.traceparent = call.span.context.format() if call.span is not None else ""
        self.via = ""  # the remote ingress's span, once this try opened a connection

    async def __call__(self) -> tuple[FlowConn, SpiffeId]:
        call = self._call
        dialed = await self._connect(call.route, self._decision, call.state, self.traceparent)
        assert isinstance(dialed.conn, FlowConn)
        self.via = dialed.via
        return dialed.conn, dialed.peer

    def next_span(self) -> str:
        """The `traceparent` the request carries upstream: on a connection this try opened
        through a gateway the remote ingress's span (the next on the path), else ours."""
        return self.via or self.traceparent


@dataclass(frozen=True, slots=True)
class TrySetup:
    """A try admitted by the service port's request budget: where it goes and how to dial."""

    decision: Decision
    key: PoolKey
    dial: Dial


class Exchanger(abc.ABC, Generic[C, G, P]):
    """The try loop and mirrors; subclasses are the protocol layers."""

    TASKS = "sidecar-exchange"  # the name of the layer's task set
    LOCAL_ANSWERS = "local_answers"  # the counter of the layer's own answers

    def __init__(
        self,
        connect: MeshConnect,
        pool: P,
        rng: random.Random,
        stats: collections.Counter[str],
        peers: PeerHealth | None = None,
    ) -> None:
        self._connect = connect
        self.pool = pool
        self._rng = rng
        self.stats = stats
        self.peers = peers
        self._tasks = TaskSet(self.TASKS)
        self._mirrors = 0

    async def aclose(self) -> None:
        await self._tasks.aclose()

    def attempts(self, call: C, *, replayable: bool = True) -> Attempts:
        """The core for `call`'s tries, starting now."""
        return Attempts(
            call.route,
            call.eff,
            self._rng,
            asyncio.get_running_loop().time(),
            outlier=call.runtime.outlier,
            peers=self.peers,
            replayable=replayable,
            record=call.record,
        )

    # -- for the layers ---------------------------------------------------------------------

    def _setup(self, call: C, target: Target) -> TrySetup | Failure:
        """Admit a try to `target` (the request budget: `max requests` refusal), its pool key
        and its dial. The layer ends the request in the budget when the try is over."""
        route = call.route
        decision = route.decision_for(target)
        address = target.endpoint.address if target.endpoint is not None else ""
        key = PoolKey(route.service, route.port.port, target.cluster, address, target.labels)
        refusal = call.runtime.pool.budget.start_request()
        if refusal is not None:
            return Failure(Outcome(LOCAL), 503, refusal.reason, refusal.detail)
        return TrySetup(decision, key, Dial(self._connect, call, decision))

    def _refusal(self, log: Any, record: RequestRecord | None, answer: Answer) -> None:
        """Count, record and log an answer the layer makes itself."""
        self.stats[self.LOCAL_ANSWERS] += 1
        if record is not None:
            record.status, record.reason = answer.status, answer.reason
        log.warning(
            "http request failed", status=answer.status, reason=answer.reason, detail=answer.detail
        )

    # -- the layer --------------------------------------------------------------------------

    @abc.abstractmethod
    async def _attempt(self, call: C, target: Target, deadline: float | None) -> G | Failure:
        """One try up to the response head; upstream failures are returned, never raised."""

    @abc.abstractmethod
    def _judge(self, got: G) -> Answered: ...

    @abc.abstractmethod
    async def _drop(self, call: C, got: G) -> None:
        """Abandon a response (retried, or a mirror's)."""

    @abc.abstractmethod
    async def _respond(self, call: C, got: G, deadline: float | None) -> bool: ...

    @abc.abstractmethod
    async def _answer(self, call: C, answer: Answer) -> bool:
        """Answer the app locally (`x-fedgate-reason`); what the layer's `local` returns."""

    @abc.abstractmethod
    def _replayable(self, call: C) -> bool:
        """Whether the request could be sent again now."""

    @abc.abstractmethod
    def _shadow(self, call: C) -> C:
        """A mirror's copy of `call` (`-shadow` host, no telemetry record, logs `mirror`)."""

    # -- the loop ---------------------------------------------------------------------------

    async def forward(self, call: C, attempts: Attempts) -> bool:
        """Route the request through its tries; what the layer's respond/answer returns."""
        loop = asyncio.get_running_loop()
        while True:
            step = attempts.next_try(loop.time())
            if isinstance(step, Answer):
                return await self._answer(call, step)
            result = await self._attempt(call, step.target, step.deadline)
            judged = result if isinstance(result, Failure) else self._judge(result)
            command = attempts.tried(judged, loop.time(), replayable=self._replayable(call))
            self._log_outliers(call, attempts)
            match command:
                case Retry():
                    self.stats["retries"] += 1
                    if not isinstance(result, Failure):
                        await self._drop(call, result)
                    if call.span is not None:
                        call.span.event(*command.span_event())
                    call.log.info("http retry", **command.log_fields())
                    await asyncio.sleep(command.backoff)
                case Respond(target=target, deadline=deadline):
                    assert not isinstance(result, Failure)
                    call.log = _bind_target(call.log, attempts.tries, target)
                    return await self._respond(call, result, deadline)
                case Answer():
                    call.log = _bind_target(call.log, attempts.tries, step.target)
                    self.stats["failed"] += 1
                    return await self._answer(call, command)
                case _:
                    raise AssertionError(f"unexpected command {command!r}")

    def _log_outliers(self, call: C, attempts: Attempts) -> None:
        if attempts.outlier_events:
            now = asyncio.get_running_loop().time()
            log_outlier_events(attempts.outlier_events, call.log, self.stats, now)

    # -- mirroring --------------------------------------------------------------------------

    def mirror(self, call: C, attempts: Attempts) -> None:
        """Send a copy of `call` in the background unless MAX_MIRRORS are already in flight."""
        if self._mirrors >= MAX_MIRRORS:
            self.stats["mirrors_dropped"] += 1
            call.log.warning("http mirror dropped", reason="too many in flight", limit=MAX_MIRRORS)
            return
        self._mirrors += 1

        async def counted() -> None:
            try:
                await self._send_mirror(self._shadow(call), attempts)
            finally:
                self._mirrors -= 1

        self._tasks.spawn(counted(), "mirror")

    async def _send_mirror(self, shadow: C, attempts: Attempts) -> None:
        try:
            where = attempts.mirror_try(asyncio.get_running_loop().time())
        except NoRouteError as e:
            self.stats["mirror_failures"] += 1
            shadow.log.info("http mirror failed", reason="no route", detail=str(e))
            return
        result = await self._attempt(shadow, where.target, where.deadline)
        if isinstance(result, Failure):
            self.stats["mirror_failures"] += 1
            shadow.log.info("http mirror failed", reason=result.reason, detail=result.detail)
            return
        self.stats["mirrored"] += 1
        shadow.log.info(
            "http mirrored",
            host=where.target.host,
            dst_cluster=where.target.cluster,
            status=self._judge(result).status,
        )
        await self._drop(shadow, result)


def try_failure(e: Exception, phase: str, eff: Effective) -> Failure:
    """How a try that raised `e` during `phase` ("connect", "request", "response") failed:
    a pool refusal (never retried), a deadline (504), a request the upstream never processed
    (replayed), a failed connect, else a reset."""
    match e:
        case PoolRefusedError(reason=reason, detail=detail):
            return Failure(Outcome(LOCAL), 503, reason, detail)
        case UnprocessedError():
            return Failure(Outcome(REFUSED), 503, "upstream reset", f"{phase}: {e}")
        case TimeoutError():
            return Failure(Outcome(TIMEOUT), 504, "upstream timeout", timeout_detail(eff, phase))
        case ProxyError() if phase == "connect":
            return Failure(Outcome(CONNECT_FAILURE), 503, "upstream connect failure", str(e))
        case ProxyError():
            return Failure(Outcome(RESET), 503, "upstream reset", f"{phase}: {e}")
        case _:
            raise AssertionError(f"not a try failure: {e!r}")


def timeout_detail(eff: Effective, phase: str) -> str:
    """The reason text of a 504: which phase missed which deadline."""
    r = eff.retries
    per_try = r.per_try_timeout if r is not None else None
    limits = [f"per-try timeout {per_try} s"] if per_try else []
    if eff.timeout:
        limits.append(f"timeout {eff.timeout} s")
    return f"{phase} not done within {' / '.join(limits) or 'the deadline'}"


def _bind_target(log: Any, tries: int, target: Target) -> Any:
    log = log.bind(tries=tries, dst_cluster=target.cluster)
    if target.endpoint is not None:
        log = log.bind(endpoint=target.endpoint.address)
    return log
