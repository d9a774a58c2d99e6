"""Pooled upstream HTTP/2 connections: one per upstream host, many streams multiplexed.

Keys are `sidecar.http.pool.PoolKey` (service, port, cluster, endpoint: a local endpoint, or a
remote cluster through the gateway, whose ingress picks one endpoint for the connection). A
request takes a stream on a live connection of its key that has room under the peer's
`SETTINGS_MAX_CONCURRENT_STREAMS`, presents an identity the current route allows and was opened
with the SVID in use. Otherwise: one connection is opened if the service's `maxConnections`
allows (requests arriving meanwhile wait for it instead of opening their own); else an idle
connection of the same service to another host is closed to make room; else the request waits
for a stream slot, counted as pending (`http1MaxPendingRequests`: beyond it, refused at once
with `PoolRefusedError`). The caller bounds every wait with its deadline.

A connection with no stream for `idle_timeout` is closed by `sweep` (GOAWAY, then the socket),
as is one whose key left the config. Every connection is registered in `live` with its peer's
identity so revocation can reset it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mesh.naming import SpiffeId
from mesh.tasks import TaskSet
from sidecar.http.flow import FlowConn
from sidecar.http.pool import IDLE_TIMEOUT, PoolKey, PoolRefusedError
from sidecar.http2.conn import H2Conn
from sidecar.pipe import Conn
from sidecar.traffic.limits import PoolBudget

Opener = Callable[[], Awaitable[tuple[FlowConn, SpiffeId]]]


@dataclass(eq=False, slots=True)
class H2Upstream:
    key: PoolKey
    h2: H2Conn
    peer: SpiffeId
    svid: object  # the SVID it was opened with (identity, not equality, matters)
    budget: PoolBudget
    idle_since: float = 0.0


class H2Pool:
    def __init__(
        self,
        live: dict[Conn, SpiffeId],
        idle_timeout: float = IDLE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._live = live
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._conns: dict[PoolKey, list[H2Upstream]] = {}
        self._opening: dict[PoolKey, asyncio.Future[H2Upstream]] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._tasks = TaskSet("sidecar-h2-pool")
        self.opened = 0  # connections opened (handshakes)
        self.streams = 0  # streams opened on them

    async def acquire(
        self,
        budget: PoolBudget,
        key: PoolKey,
        allowed: Callable[[SpiffeId], bool],
        svid: object,
        opener: Opener,
    ) -> H2Upstream:
        """A connection with room for one more stream to `key` (open the stream right away,
        before the next await, so the room is still there)."""
        while True:
            up = self._with_room(key, allowed, svid)
            if up is not None:
                self.streams += 1
                return up
            pending = self._opening.get(key)
            if pending is not None:
                await asyncio.shield(pending)  # its failure is ours too (a connect failure)
                continue
            if budget.may_open():
                await self._open(budget, key, svid, opener)
                continue
            if self._evict_idle(budget):
                await self._wait_change()  # until the evicted connection is gone
                continue
            refusal = budget.start_waiting()
            if refusal is not None:
                raise PoolRefusedError(refusal)
            try:
                await self._wait_change()
            finally:
                budget.stop_waiting()

    def connections(self, key: PoolKey) -> int:
        return len(self._conns.get(key, ()))

    def sweep(self, keep: Callable[[PoolKey], bool] | None = None) -> int:
        """Close connections idle too long, or whose key `keep` rejects (once idle)."""
        now = self._clock()
        closed = 0
        for key, ups in list(self._conns.items()):
            for up in list(ups):
                idle = up.h2.streams == 0
                expired = now - up.idle_since > self.idle_timeout
                if idle and (expired or (keep is not None and not keep(key))):
                    up.h2.close("idle")
                    closed += 1
        return closed

    async def aclose(self) -> None:
        for ups in list(self._conns.values()):
            for up in ups:
                up.h2.close("sidecar stopping")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await asyncio.gather(
                    *(up.h2.closed for ups in self._conns.values() for up in ups),
                    return_exceptions=True,
                )
        for ups in list(self._conns.values()):
            for up in ups:
                up.h2.abort()
        await self._tasks.aclose()

    # -- internals --------------------------------------------------------------------------

    def _with_room(
        self, key: PoolKey, allowed: Callable[[SpiffeId], bool], svid: object
    ) -> H2Upstream | None:
        for up in self._conns.get(key, ()):
            if up.svid is not svid or not allowed(up.peer):
                if up.h2.streams == 0:
                    up.h2.close("retired")  # opened with an old SVID or a peer no longer allowed
                continue
            if up.h2.room():
                return up
        return None

    def _evict_idle(self, budget: PoolBudget) -> bool:
        """Make room under `maxConnections` by closing the longest-idle connection of the same
        service (another endpoint's, as HTTP/1.1's pool does); True if one is (or was
        already) on its way out."""
        idle = []
        for ups in self._conns.values():
            for up in ups:
                if up.budget is not budget:
                    continue
                if not up.h2.alive:
                    return True  # closing already: its end frees a connection
                if up.h2.streams == 0:
                    idle.append(up)
        if not idle:
            return False
        min(idle, key=lambda u: u.idle_since).h2.close("evicted")
        return True

    async def _wait_change(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    async def _open(self, budget: PoolBudget, key: PoolKey, svid: object, opener: Opener) -> None:
        fut: asyncio.Future[H2Upstream] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved by waiters
        self._opening[key] = fut
        budget.opened()
        try:
            conn, peer = await opener()
        except BaseException as e:
            budget.closed()
            if isinstance(e, Exception):
                fut.set_exception(e)
            else:
                fut.cancel()
            self._wake()
            raise
        finally:
            del self._opening[key]
        self.opened += 1
        up = H2Upstream(key, H2Conn(conn, client=True), peer, svid, budget, self._clock())
        up.h2.on_change = lambda: self._changed(up)
        up.h2.start()
        self._live[conn] = peer
        self._conns.setdefault(key, []).append(up)
        self._tasks.spawn(self._run(up), f"h2-upstream-{key.cluster}-{key.endpoint}")
        fut.set_result(up)

    async def _run(self, up: H2Upstream) -> None:
        try:
            await up.h2.run()
        finally:
            ups = self._conns.get(up.key, [])
            if up in ups:
                ups.remove(up)
            if not ups:
                self._conns.pop(up.key, None)
            self._live.pop(up.h2.conn, None)
            up.budget.closed()
            self._wake()

    def _changed(self, up: H2Upstream) -> None:
        if up.h2.streams == 0:
            up.idle_since = self._clock()
        self._wake()

    def _wake(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()
