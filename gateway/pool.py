"""A small pool of long-lived tunnel connections per peer gateway, shared by every call to that
cluster. Used by the multiplexed transports (`quic`: one connection per peer; `tls`: a few, so
one TCP connection's congestion window or one CPU-bound TLS record stream is not the limit).

Rules (per peer cluster, per slot `0..size-1`):
* no connection in a slot, or it closed        -> connect (concurrent callers share one attempt)
* a call picks, among the usable connections to the current target, the one with the fewest
  open streams; if none is usable yet, it waits for the first attempt to finish
* target changed (new address, trust domain or transport) -> new connections; the old ones
  are retired: they take no new streams and close when their last stream ends
* an established connection is lost            -> one immediate reconnect attempt in the
  background, so the next call finds a warm connection; on failure, re-dials in the
  background with a bounded backoff per slot (`redial_backoff`), which calls do not shorten
* a connection fails its health probes (`gateway.health`: `unhealthy_threshold` in a row,
  or the liveness probe sent when the peer fell silent while streams waited,
  `gateway.liveness`) -> it takes no new stream at once; its driver closes it (only its
  streams reset), and it is lost as above; the peer's other connections are probed at once
  (a dead WAN takes them all)
Peer health (per peer cluster), what the egress routes on:
* the peer is *unreachable* once a connection to it was closed as unhealthy or a dial failed
  (refused, or a handshake not finished within the transport's `handshake_timeout`), and until
  one of its connections is usable again; a call waits for a dial at most `dial_wait` (2 s),
  then is refused (504, retried elsewhere by the sidecar) while the dial goes on; while it is
  unreachable with no usable connection,
  a call fails at once (`PeerDownError`: the egress answers 503 with
  `Fedgate-Peer-Health: unreachable`) instead of waiting for a dial, while the pool re-dials
* a connection dialled to an unreachable peer starts on probation: it carries calls only after
  `healthy_threshold` answered probes, so a flapping path is not trusted on one handshake
Connections probe and keep themselves alive (PINGs of each transport).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from gateway.errors import PeerDownError, TunnelError, TunnelTimeoutError
from gateway.health import ProbeHealth
from gateway.transport import PeerTarget, Stream
from mesh.naming import SpiffeId
from mesh.tasks import TaskSet

__all__ = ["Connector", "PeerPool", "PeerTarget", "PooledConnection"]

_log = structlog.get_logger("fedgate.gateway.pool")
CLOSE_SHUTDOWN = 0


class PooledConnection(Protocol):
    """What the pool needs of a transport's connection (QUIC and TLS connections have it)."""

    streams: Any  # a sized container of the open streams
    counters: dict[str, int]
    peer_identity: SpiffeId | None
    close_reason: str
    rtt: float | None
    health: ProbeHealth
    on_closed: Callable[[Any], None]

    @property
    def closed(self) -> bool: ...

    @property
    def usable(self) -> bool: ...

    def open_stream(self) -> Any: ...

    def close(self, reason: str, code: int = ...) -> None: ...

    def retire(self) -> None: ...

    def suspect(self) -> None: ...

    def revalidate(self) -> str | None: ...

    async def wait_closed(self) -> None: ...

    def _terminated(self, reason: str) -> None: ...


Connector = Callable[[PeerTarget], Awaitable[Any]]
_Slot = tuple[str, int]


class PeerPool:
    def __init__(
        self,
        connector: Connector,
        size: int = 1,
        log: Any = _log,
        redial_backoff: tuple[float, float] = (0.5, 8.0),
        dial_wait: float | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a peer pool needs at least one connection per peer")
        self._connector = connector
        self._size = size
        self._log = log
        self._backoff = redial_backoff  # first and longest wait between background re-dials
        # How long a call waits for a dial (None: the dial's own handshake timeout); the dial
        # goes on in the background for the next calls.
        self._dial_wait = dial_wait
        self._down: dict[str, str] = {}  # unreachable peer cluster -> why
        self._dial_failures: dict[_Slot, int] = {}  # consecutive
        self._wanted: dict[str, PeerTarget] = {}  # the latest target of each peer called
        self._redials: dict[_Slot, PeerTarget] = {}  # slots waiting out a re-dial backoff
        self._conns: dict[_Slot, tuple[PeerTarget, PooledConnection]] = {}
        self._connecting: dict[_Slot, tuple[PeerTarget, asyncio.Future[Any]]] = {}
        self._retired: set[Any] = set()
        self._tasks = TaskSet("gateway-pool")
        self._closing = False
        self.counters: dict[str, int] = {
            "connects": 0,
            "connect_failures": 0,
            "losses": 0,
            "streams": 0,
        }
        # The same counters per peer cluster (handshakes per gateway pair, for metrics).
        self.peer_counters: dict[str, dict[str, int]] = {}

    def _count(self, cluster: str, counter: str) -> None:
        self.counters[counter] += 1
        per = self.peer_counters.setdefault(cluster, dict.fromkeys(self.counters, 0))
        per[counter] += 1

    async def open_stream(self, target: PeerTarget) -> Stream:
        conn = await self.connection(target)
        stream: Stream = conn.open_stream()
        self._count(target.cluster, "streams")
        return stream

    async def connection(self, target: PeerTarget) -> PooledConnection:
        if self._closing:
            raise TunnelError("gateway is shutting down")
        self._wanted[target.cluster] = target
        usable: list[PooledConnection] = []
        for slot in self._slots(target.cluster):
            have = self._conns.get(slot)
            if have is not None:
                old_target, conn = have
                if old_target == target:
                    if conn.usable:
                        usable.append(conn)
                        continue
                    if _on_probation(conn):
                        continue  # it probes; it comes back or is closed
                del self._conns[slot]
                if conn.usable or _on_probation(conn):
                    self._log.info("peer gateway changed, retiring its connection", peer=target)
                    self._retire(conn)
            pending = self._connecting.get(slot)
            # A slot waiting out its re-dial backoff is not dialled by calls: a refused peer
            # would otherwise be dialled at the call rate.
            if (pending is None or pending[0] != target) and self._redials.get(slot) != target:
                self._start(slot, target)
        if usable:
            self._down.pop(target.cluster, None)
            return min(usable, key=lambda c: len(c.streams))
        down = self._down.get(target.cluster)
        if down is not None:
            raise PeerDownError(f"peer gateway unreachable ({down})")
        # asyncio.wait never cancels what it waits for: a cancelled caller leaves the
        # attempts running for the next call.
        attempts = [
            self._connecting[s][1] for s in self._slots(target.cluster) if s in self._connecting
        ]
        done, _ = await asyncio.wait(
            attempts, timeout=self._dial_wait, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            # A dial over a silently dropped link would hold the call for the whole handshake
            # timeout (5 s, as long as many clients wait): the call is refused, and retried
            # elsewhere by the sidecar, once the dial took as long as a silent link may.
            raise TunnelTimeoutError(f"peer gateway not connected within {self._dial_wait:g}s")
        first = sorted(done, key=lambda f: f.cancelled() or f.exception() is not None)[0]
        if first.cancelled():
            raise TunnelError("tunnel connect cancelled")
        got: PooledConnection = first.result()  # raises the attempt's TunnelError
        return got

    def _slots(self, cluster: str) -> list[_Slot]:
        return [(cluster, i) for i in range(self._size)]

    def _start(self, slot: _Slot, target: PeerTarget) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Mark the outcome retrieved: a background reconnect may have no waiter.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._connecting[slot] = (target, fut)
        self._tasks.spawn(self._attempt(slot, target, fut), f"connect-{slot[0]}-{slot[1]}")
        return fut

    async def _attempt(self, slot: _Slot, target: PeerTarget, fut: asyncio.Future[Any]) -> None:
        try:
            conn = await self._connector(target)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as e:
            self._count(target.cluster, "connect_failures")
            err = e if isinstance(e, TunnelError) else TunnelError(f"internal error: {e!r}")
            self._log.warning("tunnel connect failed", peer=target.cluster, reason=str(err))
            fut.set_exception(err)
            self._mark_down(target.cluster, f"dial failed: {err}")
            self._redial_later(slot, target)
            return
        finally:
            if self._connecting.get(slot, (None, None))[1] is fut:
                del self._connecting[slot]
        self._count(target.cluster, "connects")
        if self._closing:
            conn.close("gateway shutting down", CLOSE_SHUTDOWN)
            fut.set_exception(TunnelError("gateway is shutting down"))
            return
        self._dial_failures.pop(slot, None)
        if target.cluster in self._down:
            conn.health.start_probation()
        conn.on_closed = lambda c: self._lost(slot, target, c)
        self._conns[slot] = (target, conn)
        fut.set_result(conn)

    def _mark_down(self, cluster: str, why: str) -> None:
        if any(c.usable for c in self.connections_to(cluster)):
            return  # other connections carry its calls
        if cluster not in self._down:
            self._log.warning("peer gateway unreachable", peer=cluster, reason=why)
        self._down[cluster] = why

    def _redial_later(self, slot: _Slot, target: PeerTarget) -> None:
        """Keep dialling a peer in the background (bounded backoff) while calls want it."""
        if self._closing or self._wanted.get(target.cluster) != target:
            return
        n = self._dial_failures[slot] = self._dial_failures.get(slot, 0) + 1
        first, longest = self._backoff
        delay = min(longest, first * 2 ** (n - 1))
        self._redials[slot] = target
        self._tasks.spawn(self._redial(slot, target, delay), f"redial-{slot[0]}-{slot[1]}")

    async def _redial(self, slot: _Slot, target: PeerTarget, delay: float) -> None:
        try:
            await asyncio.sleep(delay)  # a backoff, not synchronisation
        finally:
            if self._redials.get(slot) == target:
                del self._redials[slot]
        if (
            not self._closing
            and self._wanted.get(target.cluster) == target
            and slot not in self._connecting
            and slot not in self._conns
        ):
            self._start(slot, target)

    def _lost(self, slot: _Slot, target: PeerTarget, conn: PooledConnection) -> None:
        self._retired.discard(conn)
        if self._conns.get(slot, (None, None))[1] is not conn:
            return
        del self._conns[slot]
        self._count(target.cluster, "losses")
        self._log.info("tunnel lost", peer=target.cluster, reason=conn.close_reason)
        if not conn.health.healthy:
            self._mark_down(target.cluster, conn.close_reason)
            for other in self.connections_to(target.cluster):
                if other.usable:
                    other.suspect()  # the same path: find out now, not after 3 probes
        if not self._closing and slot not in self._connecting:
            self._start(slot, target)  # warm reconnect; a failure is logged, the next call retries

    def _retire(self, conn: PooledConnection) -> None:
        self._retired.add(conn)
        conn.on_closed = lambda c: self._retired.discard(c)
        conn.retire()

    def forget_missing(self, clusters: set[str]) -> None:
        """Retire connections to clusters that left the snapshot (or use another transport).
        Their per-peer counters go too: the pair is no longer a link of this pool, and a
        return starts a new series (a counter reset to Prometheus)."""
        for slot in [s for s in self._conns if s[0] not in clusters]:
            _, conn = self._conns.pop(slot)
            self._retire(conn)
        for gone in set(self.peer_counters) - clusters:
            del self.peer_counters[gone]
        for table in (self._down, self._wanted):
            for gone in set(table) - clusters:
                del table[gone]
        for slot in [s for s in self._dial_failures if s[0] not in clusters]:
            del self._dial_failures[slot]

    def connections(self) -> list[PooledConnection]:
        return [c for _, c in self._conns.values()] + list(self._retired)

    def peers(self) -> set[str]:
        """Every peer cluster this pool has dialled (connected now or not)."""
        return set(self.peer_counters) | {name for name, _ in self._conns}

    def connections_to(self, cluster: str) -> list[PooledConnection]:
        return [c for (name, _), (_, c) in sorted(self._conns.items()) if name == cluster]

    def peer_health(self, cluster: str) -> str:
        """healthy (a usable connection), unreachable (module docstring), or unknown."""
        if any(c.usable for c in self.connections_to(cluster)):
            return "healthy"
        return "unreachable" if cluster in self._down else "unknown"

    def status(self) -> dict[str, Any]:
        peers: dict[str, Any] = {}
        for (cluster, _), (target, conn) in sorted(self._conns.items()):
            peer = peers.setdefault(
                cluster,
                {
                    "address": f"{target.host}:{target.port}",
                    "transport": target.transport,
                    "state": "closing",
                    "identity": None,
                    "connections": 0,
                    "open_streams": 0,
                    "streams_total": 0,
                    "rtt_ms": None,
                    "loss_ratio": None,
                    "healthy_connections": 0,
                    "health": self.peer_health(cluster),
                    "migrations": 0,
                },
            )
            loss = round(conn.health.loss_ratio, 3)
            peer["loss_ratio"] = (
                loss if peer["loss_ratio"] is None else max(peer["loss_ratio"], loss)
            )
            peer["healthy_connections"] += conn.usable
            if conn.rtt is not None:
                rtt = round(conn.rtt * 1000, 3)
                peer["rtt_ms"] = rtt if peer["rtt_ms"] is None else min(peer["rtt_ms"], rtt)
            if conn.usable:
                peer["state"] = "connected"
            if conn.peer_identity is not None:
                peer["identity"] = conn.peer_identity.uri
            peer["connections"] += 1
            peer["open_streams"] += len(conn.streams)
            peer["streams_total"] += conn.counters["streams"]
            # QUIC only: moves to a new local address (`gateway.tunnel`).
            peer["migrations"] += conn.counters.get("migrations", 0)
            local = getattr(conn, "local_address", "")
            if local:
                peer["local_address"] = local
                peer["max_datagram_size"] = getattr(conn, "max_datagram_size", None)
        for cluster, _ in self._connecting:
            peers.setdefault(cluster, {"state": "connecting", "health": self.peer_health(cluster)})
        for cluster, why in self._down.items():
            if self.peer_health(cluster) == "unreachable":
                peers.setdefault(cluster, {"state": "down", "health": "unreachable"})["down"] = why
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


def _on_probation(conn: PooledConnection) -> bool:
    """Up, but not yet trusted with calls (`ProbeHealth.start_probation`)."""
    return not conn.health.healthy and not conn.closed and not conn.close_reason
