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
where. What this module does not do: pools, codecs, telemetry of the whole request
(`sidecar.observe`).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from mesh.errors import NoRouteError
from mesh.naming import SpiffeId
from mesh.tasks import TaskSet
from mesh.telemetry import Span
from sidecar.http.pool import ServicePool
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


class Exchange(Protocol):
    """What the loop needs of a layer's call (`Call`, `H2Call`)."""

    route: ServiceRoute
    eff: Effective
    runtime: ServiceRuntime
    log: Any
    span: Span | None
    record: RequestRecord | None


C = TypeVar("C", bound=Exchange)
G = TypeVar("G")  # a layer's try that got a response head


class Exchanger(abc.ABC, Generic[C, G]):
    """The try loop and mirrors; subclasses are the protocol layers."""

    def __init__(
        self,
        connect: MeshConnect,
        rng: random.Random,
        stats: collections.Counter[str],
        peers: PeerHealth | None,
        name: str,
    ) -> None:
        self._connect = connect
        self._rng = rng
        self.stats = stats
        self.peers = peers
        self._tasks = TaskSet(name)
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
    async def _answer(self, call: C, status: int, reason: str, detail: str) -> bool: ...

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
                return await self._answer(call, step.status, step.reason, step.detail)
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
                    call.log.info(
                        "http retry",
                        try_=command.attempt,
                        host=command.host,
                        reason=command.reason,
                        detail=command.detail,
                        backoff_s=command.backoff,
                    )
                    await asyncio.sleep(command.backoff)
                case Respond(target=target, deadline=deadline):
                    assert not isinstance(result, Failure)
                    call.log = _bind_target(call.log, attempts.tries, target)
                    return await self._respond(call, result, deadline)
                case Answer(status=status, reason=reason, detail=detail):
                    call.log = _bind_target(call.log, attempts.tries, step.target)
                    self.stats["failed"] += 1
                    return await self._answer(call, status, reason, detail)
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


def _bind_target(log: Any, tries: int, target: Target) -> Any:
    log = log.bind(tries=tries, dst_cluster=target.cluster)
    if target.endpoint is not None:
        log = log.bind(endpoint=target.endpoint.address)
    return log
