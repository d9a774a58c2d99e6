"""The outbound's pool of multiplexed mTLS connections (`sidecar.smux`), per destination key.

Keys: `("local", endpoint address, service, port)` or `("remote", cluster, service, port,
subset labels)` (`destination_key`); the service is part of a local key so that the identities
a connection's peer must have are those of one route (see `revalidate`).

Rules, per key:

| situation                                           | what `acquire` does                        |
|-----------------------------------------------------|--------------------------------------------|
| a usable connection (open, no GOAWAY, below its     | the one with the fewest open streams       |
| stream limit, same client TLS context, peer allowed)|                                            |
| a connection of an older client context (new SVID   | retired: takes no new streams, closes once |
| or bundle)                                          | its streams end                            |
| a connection whose peer the decision does not allow | closed (its streams are reset)             |
| none usable, a dial under way                       | waits for that dial, then looks again      |
| none usable, fewer than `max_connections`           | dials one (the caller's `dial`)            |
| none usable, `max_connections` busy                 | None: the caller goes per-connection       |
| a connection older than `max_age`                   | retired (a renewed peer certificate, and   |
|                                                     | remote calls spread over other endpoints)  |
| no smux from the peer (`NotMultiplexedError`)       | None for `PLAIN_RETRY` s: per-connection   |

A dial that fails fails the calls waiting for it with the same reason (each counts for outlier
detection, as each would have failed dialling itself); the next call dials anew. Connections
close themselves after `idle_timeout` without streams (`SmuxConnection`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

from ca.bundle import TrustBundle
from mesh.naming import SpiffeId
from sidecar.errors import ProxyError
from sidecar.pipe import Conn
from sidecar.routes import Decision, Local, RouteTable, ServiceRoute
from sidecar.smux import SmuxConnection

PLAIN_RETRY = 60.0  # seconds before asking a peer without smux again

Key = tuple[Hashable, ...]


class NotMultiplexedError(Exception):
    """The peer answered the handshake without `fedgate-smux/1`: `conn` is a ready
    per-connection upstream (TLS done, identity checked) for the call that dialled."""

    def __init__(self, conn: Conn) -> None:
        super().__init__("peer does not multiplex")
        self.conn = conn


def destination_key(route: ServiceRoute, decision: Decision) -> Key:
    if isinstance(decision, Local):
        return ("local", decision.endpoint.address, route.service, route.port.port)
    return ("remote", decision.cluster, route.service, route.port.port, decision.labels)


def key_identities(routes: RouteTable, key: Key) -> frozenset[SpiffeId] | None:
    """The identities the peer of a connection for `key` may have under `routes`; None if
    the destination is gone (its route, or its endpoints there)."""
    service, port = key[2], key[3]
    for route in routes.routes.values():
        if route.service != service or route.port.port != port:
            continue
        if key[0] == "local":
            eps = route.endpoints.get(route.local_cluster, ())
            found = frozenset(e.identity for e in eps if e.address == key[1])
        else:
            found = frozenset(e.identity for e in route.endpoints.get(str(key[1]), ()))
        return found or None
    return None


@dataclass
class _Entry:
    conns: list[SmuxConnection] = field(default_factory=list)
    dialing: asyncio.Future[None] | None = None
    plain_until: float = 0.0


@dataclass
class _Meta:
    key: Key
    ctx: object  # the client TLS context it was dialled with


class SmuxPool:
    """See the module docstring."""

    def __init__(self, max_connections: int = 4, max_age: float = 600.0) -> None:
        self.max_connections = max_connections
        self.max_age = max_age
        self._entries: dict[Key, _Entry] = {}
        self._meta: dict[SmuxConnection, _Meta] = {}
        self.dials = 0  # connections dialled (metrics; each one handshake)

    def connections(self) -> list[SmuxConnection]:
        return list(self._meta)

    async def acquire(
        self,
        key: Key,
        ctx: object,
        allowed: Callable[[SpiffeId], bool],
        dial: Callable[[], Awaitable[SmuxConnection]],
    ) -> SmuxConnection | None:
        """A connection that takes a new stream now, or None (see the module docstring).
        Raises what `dial` raises; NotMultiplexedError goes to the dialling caller only."""
        entry = self._entries.setdefault(key, _Entry())
        while True:
            best: SmuxConnection | None = None
            live = 0
            now = time.monotonic()
            for conn in list(entry.conns):
                if self._meta[conn].ctx is not ctx or now - conn.created > self.max_age:
                    conn.retire()
                elif not allowed(conn.peer):
                    conn.close(f"server identity {conn.peer} no longer allowed")
                elif not conn.closed.done() and not conn.retiring:
                    live += 1
                    if conn.usable and (best is None or conn.open_streams < best.open_streams):
                        best = conn
            if best is not None:
                return best
            if time.monotonic() < entry.plain_until:
                return None
            if entry.dialing is not None:
                try:
                    await asyncio.shield(entry.dialing)
                except ProxyError as e:  # each call fails with its own error object
                    raise ProxyError(e.reason, e.detail) from None
                continue
            if live >= self.max_connections:
                return None
            return await self._dial(key, entry, ctx, dial)

    async def _dial(
        self,
        key: Key,
        entry: _Entry,
        ctx: object,
        dial: Callable[[], Awaitable[SmuxConnection]],
    ) -> SmuxConnection:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry.dialing = done
        try:
            conn = await dial()
        except ProxyError as e:
            done.set_exception(ProxyError(e.reason, e.detail))
            done.exception()  # retrieved: there may be no waiter
            raise
        except NotMultiplexedError:
            entry.plain_until = time.monotonic() + PLAIN_RETRY
            raise
        finally:
            if entry.dialing is done:
                entry.dialing = None
            if not done.done():
                done.set_result(None)  # cancelled or not multiplexed: waiters look again
        self.dials += 1
        entry.conns.append(conn)
        self._meta[conn] = _Meta(key, ctx)
        conn.on_closed = self._closed
        return conn

    def _closed(self, conn: SmuxConnection) -> None:
        meta = self._meta.pop(conn, None)
        if meta is None:
            return
        entry = self._entries.get(meta.key)
        if entry is not None:
            entry.conns.remove(conn)
            if not entry.conns and entry.dialing is None and not entry.plain_until:
                del self._entries[meta.key]

    def close_denied(self, bundle: TrustBundle) -> int:
        """Close the connections whose peer `bundle` now denies (and so reset their streams)."""
        closed = 0
        for conn in list(self._meta):
            entry = bundle.denial(conn.peer)
            if entry is not None:
                conn.log.warning("smux connection closed", reason="denied", entry=entry)
                conn.close(f"peer denied: {entry}")
                closed += 1
        return closed

    def revalidate(self, routes: RouteTable) -> None:
        """After a snapshot: a connection whose destination is gone takes no new streams; one
        whose peer's identity the destination no longer has is closed."""
        for conn, meta in list(self._meta.items()):
            identities = key_identities(routes, meta.key)
            if identities is None:
                conn.retire()
            elif conn.peer not in identities:
                conn.close(f"server identity {conn.peer} no longer allowed")

    def close_all(self, reason: str) -> None:
        for conn in list(self._meta):
            conn.close(reason)

    def status(self) -> dict[str, int]:
        return {
            "connections": len(self._meta),
            "streams": sum(c.open_streams for c in self._meta),
            "dialled": self.dials,
        }
