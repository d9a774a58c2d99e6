"""Retries and timeouts of one request as a pure plan: what each try may take, whether to retry.

Conditions (`retryOn`, Envoy's meanings):

| condition | retries when the try |
|---|---|
| `5xx` | got a 5xx, failed to connect, was reset before a response, or hit its per-try timeout |
| `gateway-error` | got a 502, 503 or 504, or hit its per-try timeout |
| `reset` | was reset (or the connection closed) before a response, or hit its per-try timeout |
| `connect-failure` | could not connect (TCP, gateway CONNECT, TLS, identity, stream reply) |
| `refused-stream` | was not processed by the upstream (see below) |
| `retriable-status-codes` | got one of `retriableStatusCodes` |
| `unavailable`, `cancelled`, ... | (gRPC) got that `grpc-status` in a Trailers-Only answer |

The gRPC conditions are Envoy's (`cancelled`, `deadline-exceeded`, `internal`,
`resource-exhausted`, `unavailable`), judged as Envoy does: on a `grpc-status` in the response
headers (an answer without messages), not in trailers after a streamed body.

Without a `retries` policy a request gets Istio's default, `attempts: 2` on
`connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` with 503
(`DEFAULT_RETRIES`); a policy without `retryOn` gets those conditions too. A refusal by the
sidecar itself (connection-pool overflow, no route) is never retried.

A try the upstream provably never processed (`REFUSED`: an HTTP/2 stream above a GOAWAY's
last-stream-id or reset with REFUSED_STREAM, RFC 9113 §8.7; a request not sent because its
connection was going away; an HTTP/1.1 request on a reused connection that closed before any
response byte) is replayed on a new connection whatever `retryOn` and `attempts` say, up to
`MAX_REPLAYS` times and without backoff, as Go's and Chromium's HTTP clients do: the app must
not see a race between its request and the server's idle close. Only a body that can be sent
again, and the overall timeout, limit it. Between tries the plan
waits a fully jittered exponential backoff (25 ms base, 250 ms cap, Envoy's defaults), and never
past the overall `timeout`, which spans every try, from the first try to the end of the
response. A try's deadline is the earlier of its `perTryTimeout` and the overall deadline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mesh.model import Retries

BASE_BACKOFF = 0.025
MAX_BACKOFF = 0.25
DEFAULT_RETRY_ON = (
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "retriable-status-codes",
)
DEFAULT_RETRY_CODES = (503,)
DEFAULT_RETRIES = Retries(attempts=2, retry_on=DEFAULT_RETRY_ON, retriable_status_codes=(503,))
MAX_REPLAYS = 3  # replays of unprocessed tries per request (not counted as retries)

# Outcome kinds; "status" carries the code.
STATUS = "status"
CONNECT_FAILURE = "connect-failure"
RESET = "reset"
REFUSED = "refused-stream"  # the upstream never processed the request: safe to send again
TIMEOUT = "timeout"  # this try's deadline passed (per-try or overall)
LOCAL = "local"  # the sidecar refused (overflow, no route): never retried

# gRPC retry conditions and the grpc-status each names (Envoy's x-envoy-retry-grpc-on).
GRPC_CONDITIONS = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}
# gRPC codes Envoy maps to a 5xx for outlier detection (UNKNOWN, DEADLINE_EXCEEDED,
# UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS).
GRPC_5XX = frozenset((2, 4, 12, 13, 14, 15))


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    status: int = 0
    grpc: int | None = None  # grpc-status of a gRPC Trailers-Only answer

    @property
    def failed(self) -> bool:
        """What outlier detection counts as a failure (Envoy's consecutive 5xx, local origin
        errors included; a gRPC status counts as the HTTP status it maps to)."""
        return self.kind in (CONNECT_FAILURE, RESET, TIMEOUT) or (
            self.kind == STATUS and (self.status >= 500 or self.grpc in GRPC_5XX)
        )


def retriable(retries: Retries, outcome: Outcome) -> bool:
    conditions = retries.retry_on or DEFAULT_RETRY_ON
    codes = retries.retriable_status_codes if retries.retry_on else DEFAULT_RETRY_CODES
    kind, status = outcome.kind, outcome.status
    for c in conditions:
        if c == "5xx" and (kind in (CONNECT_FAILURE, RESET, REFUSED, TIMEOUT) or status >= 500):
            return True
        if c == "gateway-error" and (kind == TIMEOUT or status in (502, 503, 504)):
            return True
        if c == "reset" and kind in (RESET, REFUSED, TIMEOUT):
            return True
        if c == REFUSED and kind == REFUSED:
            return True
        if c == CONNECT_FAILURE and kind == CONNECT_FAILURE:
            return True
        if c == "retriable-status-codes" and kind == STATUS and status in codes:
            return True
        if c in GRPC_CONDITIONS and kind == STATUS and outcome.grpc == GRPC_CONDITIONS[c]:
            return True
    return False


class RetryPlan:
    """The tries of one request. `now` is any monotonic clock, in seconds. `retries` None:
    `DEFAULT_RETRIES`."""

    def __init__(
        self,
        retries: Retries | None,
        timeout: float | None,
        now: float,
        rng: random.Random,
        *,
        replayable: bool = True,
    ) -> None:
        self.retries = retries if retries is not None else DEFAULT_RETRIES
        self.deadline = now + timeout if timeout else None
        self._rng = rng
        self.tries = 0  # started so far
        self.replays = 0  # of them, replays of unprocessed tries (not retries)
        self.replayable = replayable  # False: the request body cannot be sent again

    @property
    def max_tries(self) -> int:
        return 1 + self.retries.attempts

    def start_try(self, now: float) -> float | None:
        """Count a try starting at `now`; its deadline (None: none)."""
        self.tries += 1
        per_try = self.retries.per_try_timeout
        ends = [d for d in (self.deadline, now + per_try if per_try else None) if d is not None]
        return min(ends) if ends else None

    def overall_expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def backoff(self, outcome: Outcome, now: float) -> float | None:
        """Seconds to wait before the next try, or None: answer with this outcome."""
        if not self.replayable or outcome.kind == LOCAL or self.overall_expired(now):
            return None
        if outcome.kind == REFUSED and self.replays < MAX_REPLAYS:
            self.replays += 1
            return 0.0  # on a new connection at once; the request never reached the app
        retries = self.tries - self.replays - 1
        if retries >= self.retries.attempts or not retriable(self.retries, outcome):
            return None
        upper = min(MAX_BACKOFF, BASE_BACKOFF * (2 ** (retries + 1) - 1))
        wait = self._rng.uniform(0, upper)
        if self.deadline is not None and now + wait >= self.deadline:
            return None
        return wait
