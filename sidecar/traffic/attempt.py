"""One request's tries as a pure state machine: the request-attempt core of both HTTP layers.

The HTTP/1.1 and HTTP/2 drivers (`sidecar.http.exchange`, with `sidecar.http.forward` and
`sidecar.http2.forward` as their layers) feed it what happened and `now`, and do what its
commands say; it does no I/O and reads no clock. It owns: which target a try goes to (the
route's balancer, skipping hosts that outlier detection ejected, that the local gateway said it
cannot reach, or that an earlier try of this request already failed on: Envoy's previous-hosts
predicate, extended to clusters, so a retry goes to another endpoint and, where the policy's
weights allow one, another cluster), each try's deadline (the earlier of `perTryTimeout` and
the overall `timeout`), the retry decision and its backoff (`sidecar.traffic.retry`), outlier
reporting, and what the request's telemetry records (`sidecar.traffic.record`). Opaque TCP
connections use it too (`sidecar.outbound`): a failed dial is a try, `Connected` its success.

| state | driver calls | core answers | next state |
|---|---|---|---|
| ready | `next_try(now)` | `Try`: send it | trying |
| ready | `next_try(now)` | `Answer`: 503 no route, answer locally | done |
| trying | `tried(result, now)` | `Retry`: drop the response, back off | ready |
| trying | `tried(result, now)` | `Respond`: stream the response | done |
| trying | `tried(result, now)` | `Answer`: answer with the try's failure | done |
| done | either | AssertionError (a driver bug) | - |

What it does not do: pools, sockets, timers, logging, spans (the drivers), and mirror
admission (bounded in-flight mirrors are a driver's tasks); `mirror_target` only says where a
mirror goes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mesh.errors import NoRouteError
from sidecar.traffic.balance import Balancer, Healthy, Target
from sidecar.traffic.experiments import mirror_this
from sidecar.traffic.match import Effective
from sidecar.traffic.outlier import Event as OutlierEvent
from sidecar.traffic.outlier import OutlierDetector
from sidecar.traffic.peers import PeerHealth
from sidecar.traffic.record import RequestRecord
from sidecar.traffic.retry import LOCAL, REFUSED, STATUS, Outcome, RetryPlan

MIRROR_TIMEOUT = 10.0  # a mirror's deadline when the policy sets no timeout


class Routable(Protocol):
    """What the core needs of a route (`sidecar.routes.ServiceRoute`, which builds on this
    package: naming it here would be an import cycle)."""

    @property
    def balancer(self) -> Balancer: ...

    def target(
        self,
        eff: Effective,
        rng: random.Random,
        healthy: Healthy,
        exclude: frozenset[str] = frozenset(),
        *,
        subset: str | None = None,
        cluster_ref: str = "",
    ) -> Target: ...


# -- what a try ended with (driver -> core) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answered:
    """The try got a response head: its status (and a gRPC Trailers-Only `grpc-status`)."""

    status: int
    grpc: int | None = None

    @property
    def outcome(self) -> Outcome:
        return Outcome(STATUS, self.status, self.grpc)

    @property
    def detail(self) -> str:
        g = f", grpc-status {self.grpc}" if self.grpc is not None else ""
        return f"status {self.status}{g}"


@dataclass(frozen=True, slots=True)
class Failure:
    """The try got no usable response: how retries and outlier detection judge it, and the
    local answer (`status`, `reason` in `x-fedgate-reason`, `detail`) if it is the last."""

    outcome: Outcome
    status: int
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Connected:
    """An opaque TCP try's upstream is set up: from here on its bytes are the app's."""

    outcome = Outcome(STATUS, 200)
    status = 0
    grpc = None
    detail = "connected"


TryResult = Answered | Failure | Connected


# -- what the driver does next (core -> driver) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Try:
    number: int  # 1 for the first try
    target: Target
    deadline: float | None  # on the `now` scale; None: none


@dataclass(frozen=True, slots=True)
class Retry:
    """Drop the try's response (if any), record the retry, wait `backoff` seconds, then ask
    `next_try`."""

    attempt: int  # the try that failed
    host: str
    reason: str
    detail: str
    backoff: float

    def span_event(self) -> tuple[str, dict[str, str | int]]:
        return "retry", {"attempt": self.attempt, "host": self.host, "why": self.detail}

    def log_fields(self) -> dict[str, object]:
        """The fields of the driver's retry log line."""
        return {
            "try_": self.attempt,
            "host": self.host,
            "reason": self.reason,
            "detail": self.detail,
            "backoff_s": self.backoff,
        }


@dataclass(frozen=True, slots=True)
class Respond:
    """Stream the last try's response to the app, within the overall deadline."""

    target: Target
    deadline: float | None


@dataclass(frozen=True, slots=True)
class Answer:
    """Answer the app locally. `upstream_failed`: a try failed (not a refusal before any)."""

    status: int
    reason: str
    detail: str
    upstream_failed: bool = False


Command = Try | Retry | Respond | Answer


def health_check(
    outlier: OutlierDetector | None, now: float, peers: PeerHealth | None = None
) -> Callable[[str], bool]:
    """A host is healthy unless outlier detection ejected it or (a remote cluster) the local
    gateway said it cannot reach that cluster (`sidecar.traffic.peers`)."""
    if outlier is None and peers is None:
        return lambda host: True
    return lambda host: (
        (outlier is None or not outlier.is_ejected(host, now))
        and (peers is None or peers.healthy(host, now))
    )


class Attempts:
    """The tries of one request to `route` under the effective policy `eff`."""

    def __init__(
        self,
        route: Routable,
        eff: Effective,
        rng: random.Random,
        now: float,
        *,
        outlier: OutlierDetector | None = None,
        peers: PeerHealth | None = None,
        replayable: bool = True,
        record: RequestRecord | None = None,
    ) -> None:
        self.route = route
        self.eff = eff
        self._rng = rng
        self.outlier = outlier
        self.peers = peers
        self.plan = RetryPlan(eff.retries, eff.timeout, now, rng, replayable=replayable)
        self.record = record if record is not None else RequestRecord()
        self.tried_hosts: set[str] = set()
        self.outlier_events: list[OutlierEvent] = []  # for the driver to log; it clears them
        self._current: Try | None = None  # the try in flight, then the request's last
        self._state = "ready"

    @property
    def tries(self) -> int:
        return self.plan.tries

    @property
    def target(self) -> Target | None:
        """The current (or last) try's target."""
        return self._current.target if self._current is not None else None

    def next_try(self, now: float) -> Try | Answer:
        assert self._state == "ready", f"next_try when {self._state}"
        deadline = self.plan.start_try(now)
        healthy = health_check(self.outlier, now, self.peers)
        try:
            target = self.route.target(self.eff, self._rng, healthy, frozenset(self.tried_hosts))
        except NoRouteError as e:
            return self._answer(Answer(503, "no route", str(e)))
        self._current = Try(self.plan.tries, target, deadline)
        self._state = "trying"
        return self._current

    def tried(
        self, result: TryResult, now: float, *, replayable: bool | None = None
    ) -> Retry | Respond | Answer:
        """The current try ended with `result` at `now`. `replayable`: whether the request
        could still be sent again (a streamed body may have been consumed by this try)."""
        current = self._current
        assert self._state == "trying", f"tried when {self._state}"
        assert current is not None
        target = current.target
        if result.outcome.kind != REFUSED:
            # A host that never processed the request (GOAWAY, a stale pooled connection) did
            # nothing wrong: its replay may go there again, on a new connection.
            self.tried_hosts.add(target.host)
        self._report(target.host, result.outcome, now)
        if replayable is not None:
            self.plan.replayable = replayable
        wait = self.plan.backoff(result.outcome, now)
        if wait is not None:
            if isinstance(result, Failure):
                reason, detail = result.reason, f"{result.reason}: {result.detail}"
            else:
                reason, detail = "retryable status", result.detail
            self._state = "ready"
            return Retry(current.number, target.host, reason, detail, wait)
        rec = self.record
        rec.dst_cluster = target.cluster
        rec.endpoint = target.endpoint.address if target.endpoint is not None else ""
        rec.subset = target.subset
        rec.went_to(target)
        rec.retries = self.plan.tries - 1
        if isinstance(result, Failure):
            failed = Answer(result.status, result.reason, result.detail, upstream_failed=True)
            return self._answer(failed)
        self._state = "done"
        rec.status = result.status
        rec.grpc_status = result.grpc
        return Respond(target, self.plan.deadline)

    def _answer(self, answer: Answer) -> Answer:
        self._state = "done"
        self.record.status, self.record.reason = answer.status, answer.reason
        return answer

    def _report(self, host: str, outcome: Outcome, now: float) -> None:
        """A try's outcome, for outlier detection (local refusals say nothing of the host)."""
        outlier = self.outlier
        if outlier is None or outcome.kind == LOCAL:
            return
        outlier.record(host, outcome.failed, now, len(self.route.balancer.hosts()))
        self.outlier_events.extend(outlier.events)
        outlier.events.clear()

    # -- mirroring ------------------------------------------------------------------------------

    def mirror(self) -> bool:
        """Whether this request is mirrored (the policy's percentage, drawn once)."""
        return mirror_this(self.eff.mirror, self._rng)

    def mirror_try(self, now: float) -> Try:
        """Where the mirror goes (the mirror's subset or cluster; health is not consulted) and
        its deadline; NoRouteError if nowhere."""
        mirror = self.eff.mirror
        assert mirror is not None
        target = self.route.target(
            self.eff,
            self._rng,
            lambda h: True,
            subset=mirror.subset or None,
            cluster_ref=mirror.cluster,
        )
        return Try(1, target, now + (self.eff.timeout or MIRROR_TIMEOUT))
