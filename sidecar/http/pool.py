"""Pooled upstream connections for HTTP/1.1: the inner mTLS connection is reused across requests.

A pooled connection is bound to what its stream header named (service, port) and to where it
leads: one local endpoint, or one remote cluster through the gateway (whose ingress picked the
endpoint). `PoolKey` says exactly that. A connection carries one request at a time
(HTTP/1.1 without pipelining) and returns to its key's idle list when the exchange ended
cleanly with both sides persistent.

Limits (`sidecar.traffic.limits.PoolBudget`, one per service port): `acquire` reuses an idle
connection, else opens one if `maxConnections` allows, else closes an idle connection of
another key to make room, else queues (`http1MaxPendingRequests`) until a connection is
released or closed; beyond the queue it raises `PoolRefusedError` at once. The caller bounds the
wait with its deadline (asyncio.timeout).

An idle connection is reused only if it is still open with nothing unread, younger than
`idle_timeout` idle, presents an identity the current decision allows, and was opened with the
SVID in use now (an identity rotation retires the pool gradually). Every pooled connection is
registered in `live` (its peer identity) so revocation can reset it. What this module does not
do: choose targets, parse HTTP, retry.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from mesh.naming import ServiceKey, SpiffeId
from mesh.tasks import TaskSet
from sidecar.errors import ProxyError
from sidecar.http.flow import FlowConn
from sidecar.pipe import Conn
from sidecar.traffic.limits import PoolBudget, Refusal

IDLE_TIMEOUT = 30.0  # below common server keep-alive timeouts (the app's side closes later)
CLOSE_GRACE = 2.0  # an idle connection we close waits this long for the peer's own close
MAX_IDLE_PER_KEY = 64


@dataclass(frozen=True, slots=True)
class PoolKey:
    service: ServiceKey
    port: int
    cluster: str
    endpoint: str  # the endpoint address; "" for a remote cluster (through the gateway)
    labels: tuple[tuple[str, str], ...] = ()  # remote: the subset the ingress picked within


@dataclass(eq=False, slots=True)
class Upstream:
    key: PoolKey
    conn: FlowConn
    peer: SpiffeId
    svid: object  # the SVID it was opened with (identity, not equality, matters)
    idle_since: float = 0.0
    served: int = 0


class PoolRefusedError(ProxyError):
    """A connection-pool limit refused the request (answer 503, never retry)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason, refusal.detail)


@dataclass(eq=False, slots=True)
class ServicePool:
    """The pool of one service port: its budget, idle connections and waiting requests."""

    budget: PoolBudget = field(default_factory=PoolBudget)
    idle: dict[PoolKey, list[Upstream]] = field(default_factory=dict)
    waiters: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)

    def idle_count(self) -> int:
        return sum(len(v) for v in self.idle.values())


Opener = Callable[[], Awaitable[tuple[FlowConn, SpiffeId]]]


class UpstreamPool:
    def __init__(
        self,
        live: dict[Conn, SpiffeId],
        idle_timeout: float = IDLE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._live = live
        self.idle_timeout = idle_timeout
        self._clock = clock
        self.opened = 0  # connections opened (handshakes), for status and tests
        self._closing = TaskSet("sidecar-http-pool")
        self.reused = 0  # requests served on a pooled connection

    async def acquire(
        self,
        svc: ServicePool,
        key: PoolKey,
        allowed: Callable[[SpiffeId], bool],
        svid: object,
        opener: Opener,
        *,
        fresh: bool = False,
    ) -> tuple[Upstream, bool]:
        """A connection for one request to `key` and whether it was reused (`fresh`: never)."""
        while True:
            up = None if fresh else self._take_idle(svc, key, allowed, svid)
            if up is not None:
                self.reused += 1
                up.served += 1
                return up, True
            if svc.budget.may_open():
                svc.budget.opened()
                try:
                    conn, peer = await opener()
                except BaseException:
                    svc.budget.closed()
                    self._wake(svc)
                    raise
                self.opened += 1
                self._live[conn] = peer
                return Upstream(key, conn, peer, svid, served=1), False
            if self._evict_one(svc):
                continue
            refusal = svc.budget.start_waiting()
            if refusal is not None:
                raise PoolRefusedError(refusal)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            svc.waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._wake(svc)  # woken, then cancelled: pass the wake-up on
                elif fut in svc.waiters:
                    svc.waiters.remove(fut)
                raise
            finally:
                svc.budget.stop_waiting()

    def release(self, svc: ServicePool, up: Upstream, reusable: bool) -> None:
        """The request on `up` is over; keep the connection if `reusable` and still usable."""
        if reusable and up.conn.usable and len(svc.idle.get(up.key, ())) < MAX_IDLE_PER_KEY:
            up.idle_since = self._clock()
            svc.idle.setdefault(up.key, []).append(up)
        else:
            self._close(svc, up, reset=not reusable)
        self._wake(svc)

    def discard(self, svc: ServicePool, up: Upstream) -> None:
        """Drop a connection in use (failed, timed out, upgraded and finished): reset it."""
        self._close(svc, up, reset=True)
        self._wake(svc)

    def detach(self, svc: ServicePool, up: Upstream) -> None:
        """Stop accounting `up` as pooled (an upgraded connection, now spliced)."""
        svc.budget.closed()
        self._wake(svc)

    def forget(self, up: Upstream) -> None:
        """A detached connection ended."""
        self._live.pop(up.conn, None)

    def sweep(self, svc: ServicePool, keep: Callable[[PoolKey], bool] | None = None) -> int:
        """Close idle connections that expired, broke, or whose key `keep` rejects."""
        now = self._clock()
        closed = 0
        for key in list(svc.idle):
            ups = svc.idle[key]
            for up in list(ups):
                stale = now - up.idle_since > self.idle_timeout or not up.conn.usable
                if stale or (keep is not None and not keep(key)):
                    ups.remove(up)
                    self._close(svc, up, reset=False)
                    closed += 1
            if not ups:
                del svc.idle[key]
        if closed:
            self._wake(svc)
        return closed

    async def close_all(self, pools: Iterable[ServicePool]) -> None:
        """Close every idle connection and wait (bounded) until their transports are gone."""
        closing = []
        for svc in pools:
            for ups in svc.idle.values():
                for up in ups:
                    self._close(svc, up, reset=False)
                    closing.append(up.conn)
            svc.idle.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_GRACE + 0.5):
                await asyncio.gather(*(c.closed for c in closing), return_exceptions=True)
        await self._closing.aclose()
        for c in closing:
            c.reset_if_open()

    # -- internals --------------------------------------------------------------------------

    def _take_idle(
        self, svc: ServicePool, key: PoolKey, allowed: Callable[[SpiffeId], bool], svid: object
    ) -> Upstream | None:
        ups = svc.idle.get(key)
        now = self._clock()
        while ups:
            up = ups.pop()  # most recently used first: the likeliest to be alive
            if (
                up.conn.usable
                and now - up.idle_since <= self.idle_timeout
                and allowed(up.peer)
                and up.svid is svid
            ):
                return up
            self._close(svc, up, reset=False)
        return None

    def _evict_one(self, svc: ServicePool) -> bool:
        """Close the oldest idle connection of any key, to open one where it is needed."""
        oldest: Upstream | None = None
        for ups in svc.idle.values():
            for up in ups:
                if oldest is None or up.idle_since < oldest.idle_since:
                    oldest = up
        if oldest is None:
            return False
        svc.idle[oldest.key].remove(oldest)
        if not svc.idle[oldest.key]:
            del svc.idle[oldest.key]
        self._close(svc, oldest, reset=False)
        return True

    def _close(self, svc: ServicePool, up: Upstream, reset: bool) -> None:
        svc.budget.closed()
        self._live.pop(up.conn, None)
        if reset:
            up.conn.reset_if_open()
        else:
            self._closing.spawn(up.conn.close_gracefully(CLOSE_GRACE), "close")

    def _wake(self, svc: ServicePool) -> None:
        while svc.waiters:
            fut = svc.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
