"""The tries of one opaque TCP connection into the mesh: a failed dial is retried elsewhere.

The app's connection is accepted but not read from until its upstream is ready
(`sidecar.outbound`), so a dial that fails (TCP to the endpoint or the local gateway, the
gateway's CONNECT refusal, TLS, identity, the stream reply) has shown the app nothing and can be
tried again, on another endpoint and cluster. The choice is the request-attempt core's
(`sidecar.traffic.attempt.Attempts`, as for HTTP): the policy's weights, outlier ejections, the
clusters the local gateway cannot reach, and the hosts and clusters this connection already
failed on (Envoy's previous-hosts predicate). The connection gets the policy's
`retries.attempts` (Istio's default 2 without a policy) for failed dials, whatever `retryOn`
says: no byte of the app's has gone anywhere. An AuthorizationPolicy refusal is not retried (it
would be the same elsewhere) and says nothing of the endpoint's health. What this module does
not do: dial (`sidecar.dial`), relay, or count the app's connection against the pool limits.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from dataclasses import replace
from typing import Any

from mesh.model import Retries
from sidecar.dial import AUTHZ_DENIED, MeshDialer
from sidecar.errors import ProxyError
from sidecar.http.exchange import Dialed
from sidecar.observe import log_outlier_events
from sidecar.routes import Decision, ServiceRoute
from sidecar.state import ProxyState
from sidecar.traffic.attempt import Answer, Attempts, Connected, Failure, Retry
from sidecar.traffic.match import Effective, effective
from sidecar.traffic.outlier import OutlierDetector
from sidecar.traffic.retry import CONNECT_FAILURE, DEFAULT_RETRIES, LOCAL, Outcome


def tcp_effective(route: ServiceRoute) -> Effective:
    """What a connection's tries run on: the policy's weights and `retries.attempts`, for
    failed dials only; no deadline beyond the dial's own (HTTP timeouts are not TCP's)."""
    eff = effective(route.policy, None)
    attempts = (eff.retries or DEFAULT_RETRIES).attempts
    return replace(eff, retries=Retries(attempts, retry_on=(CONNECT_FAILURE,)), timeout=None)


async def dial_tries(
    dialer: MeshDialer,
    route: ServiceRoute,
    state: ProxyState,
    traceparent: str,
    *,
    rng: random.Random,
    outlier: OutlierDetector | None,
    multiplex: bool,
    tried: list[Decision],
    log: Any,
    stats: collections.Counter[str],
) -> Dialed:
    """A ready mesh upstream for one app connection; each try's decision is appended to
    `tried`. ProxyError (the last try's, or `no route`) when every try failed."""
    attempts = Attempts(
        route, tcp_effective(route), rng, time.monotonic(), outlier=outlier, peers=dialer.peers
    )
    while True:
        step = attempts.next_try(time.monotonic())
        if isinstance(step, Answer):
            raise ProxyError(step.reason, step.detail)
        decision = route.decision_for(step.target)
        tried.append(decision)
        dial = dialer.multiplexed if multiplex else dialer.upstream
        try:
            dialed = await dial(route, decision, state, traceparent)
        except ProxyError as e:
            kind = LOCAL if e.reason == AUTHZ_DENIED else CONNECT_FAILURE
            failed = Failure(Outcome(kind), 503, e.reason, e.detail)
            command = attempts.tried(failed, time.monotonic())
            _log_outliers(attempts, route, log, stats)
            if not isinstance(command, Retry):
                raise
        else:
            attempts.tried(Connected(), time.monotonic())
            _log_outliers(attempts, route, log, stats)
            return dialed
        stats["tcp_retries"] += 1
        log.info("outbound retry", **command.log_fields())
        await asyncio.sleep(command.backoff)


def _log_outliers(attempts: Attempts, route: ServiceRoute, log: Any, stats: Any) -> None:
    if attempts.outlier_events:
        tlog = log.bind(service=str(route.service), mode="tcp")
        log_outlier_events(attempts.outlier_events, tlog, stats, time.monotonic())
