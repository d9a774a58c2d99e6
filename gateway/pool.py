"""One long-lived tunnel connection per peer gateway, shared by every call to that cluster.

Rules (per peer cluster):
* no connection, or the last one is closed    -> connect (concurrent callers share one attempt)
* connected, same target                      -> reuse
* connected, target changed (new address, new trust domain) -> open a new one; the old one is
  retired: it takes no new streams and closes when its last stream ends
* an established connection is lost           -> one immediate reconnect attempt in the
  background, so the next call finds a warm connection; on failure, the next call retries
The connection keeps itself alive with PINGs (`TunnelSettings.keepalive_interval`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.errors import TunnelError
from gateway.tunnel import CLOSE_SHUTDOWN, TunnelConnection
from mesh.tasks import TaskSet

_log = structlog.get_logger("fedgate.gateway.pool")


@dataclass(frozen=True, slots=True)
class PeerTarget:
    cluster: str
    host: str
    port: int
    trust_domain: str


Connector = Callable[[PeerTarget], Awaitable[TunnelConnection]]


class PeerPool:
    def __init__(self, connector: Connector, log: Any = _log) -> None:
        self._connector = connector
        self._log = log
        self._conns: dict[str, tuple[PeerTarget, TunnelConnection]] = {}
        self._connecting: dict[str, tuple[PeerTarget, asyncio.Future[TunnelConnection]]] = {}
        self._retired: set[TunnelConnection] = set()
        self._tasks = TaskSet("gateway-pool")
        self._closing = False
        self.counters: dict[str, int] = {"connects": 0, "connect_failures": 0, "losses": 0}

    async def connection(self, target: PeerTarget) -> TunnelConnection:
        if self._closing:
            raise TunnelError("gateway is shutting down")
        have = self._conns.get(target.cluster)
        if have is not None:
            old_target, conn = have
            if conn.usable and old_target == target:
                return conn
            del self._conns[target.cluster]
            if conn.usable:
                self._log.info("peer gateway changed, retiring its connection", peer=target)
                self._retire(conn)
        pending = self._connecting.get(target.cluster)
        fut = pending[1] if pending is not None and pending[0] == target else self._start(target)
        return await asyncio.shield(fut)

    def _start(self, target: PeerTarget) -> asyncio.Future[TunnelConnection]:
        fut: asyncio.Future[TunnelConnection] = asyncio.get_running_loop().create_future()
        # Mark the outcome retrieved: a background reconnect may have no waiter.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._connecting[target.cluster] = (target, fut)
        self._tasks.spawn(self._attempt(target, fut), f"connect-{target.cluster}")
        return fut

    async def _attempt(self, target: PeerTarget, fut: asyncio.Future[TunnelConnection]) -> None:
        try:
            conn = await self._connector(target)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as e:
            self.counters["connect_failures"] += 1
            err = e if isinstance(e, TunnelError) else TunnelError(f"internal error: {e!r}")
            self._log.warning("tunnel connect failed", peer=target.cluster, reason=str(err))
            fut.set_exception(err)
            return
        finally:
            if self._connecting.get(target.cluster, (None, None))[1] is fut:
                del self._connecting[target.cluster]
        self.counters["connects"] += 1
        if self._closing:
            conn.close("gateway shutting down", CLOSE_SHUTDOWN)
            fut.set_exception(TunnelError("gateway is shutting down"))
            return
        conn.on_closed = lambda c: self._lost(target, c)
        self._conns[target.cluster] = (target, conn)
        fut.set_result(conn)

    def _lost(self, target: PeerTarget, conn: TunnelConnection) -> None:
        self._retired.discard(conn)
        if self._conns.get(target.cluster, (None, None))[1] is not conn:
            return
        del self._conns[target.cluster]
        self.counters["losses"] += 1
        self._log.info("tunnel lost", peer=target.cluster, reason=conn.close_reason)
        if not self._closing and target.cluster not in self._connecting:
            self._start(target)  # warm reconnect; a failure is logged, the next call retries

    def _retire(self, conn: TunnelConnection) -> None:
        self._retired.add(conn)
        conn.on_closed = lambda c: self._retired.discard(c)
        conn.retire()

    def forget_missing(self, clusters: set[str]) -> None:
        """Retire connections to clusters that left the snapshot."""
        for cluster in [c for c in self._conns if c not in clusters]:
            _, conn = self._conns.pop(cluster)
            self._retire(conn)

    def connections(self) -> list[TunnelConnection]:
        return [c for _, c in self._conns.values()] + list(self._retired)

    def status(self) -> dict[str, Any]:
        peers: dict[str, Any] = {}
        for cluster, (target, conn) in sorted(self._conns.items()):
            peers[cluster] = {
                "address": f"{target.host}:{target.port}",
                "state": "connected" if conn.usable else "closing",
                "identity": conn.peer_identity.uri if conn.peer_identity else None,
                "open_streams": len(conn.streams),
                "streams_total": conn.counters["streams"],
            }
        for cluster in self._connecting:
            peers.setdefault(cluster, {"state": "connecting"})
        return {"peers": peers, "retired": len(self._retired), **self.counters}

    async def aclose(self, grace: float = 1.0) -> None:
        self._closing = True
        await self._tasks.aclose()
        conns = self.connections()
        self._conns.clear()
        self._retired.clear()
        for conn in conns:
            conn.close("gateway shutting down", CLOSE_SHUTDOWN)
        if conns:
            await asyncio.wait(
                [asyncio.ensure_future(c.wait_closed()) for c in conns], timeout=grace
            )
        for conn in conns:
            conn._terminated("gateway shut down")
