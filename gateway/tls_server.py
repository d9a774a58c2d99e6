"""The `tls` transport's listener and dialer: `TlsTunnelServer` accepts peer gateways on TCP
(a fresh `TlsTunnelConnection` per connection, with the current TLS context, so identity and
trust bundle changes apply to the next handshake); `connect` opens, authenticates and waits for
the peer's READY. The connection itself is `gateway.tls_tunnel`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, cast

import structlog

from gateway.errors import TunnelError, TunnelTimeoutError
from gateway.quic_mtls import PeerPolicy
from gateway.tls_tunnel import TlsTunnelConnection, TlsTunnelSettings
from gateway.transport import StreamHandler, TcpListener
from mesh.naming import SpiffeId

_log = structlog.get_logger("fedgate.gateway.tls")


class TlsTunnelServer(TcpListener):
    """Listens on TCP for peer gateways (`tls` transport)."""

    def __init__(
        self,
        settings: TlsTunnelSettings,
        context: Callable[[], ssl.SSLContext],
        policy: PeerPolicy,
        stream_handler: StreamHandler,
        identify: Callable[[SpiffeId], str] | None = None,
        log: Any = _log,
    ) -> None:
        self.settings = settings
        self._context = context  # read per connection: identity and bundle may change
        self._policy = policy
        self._handler = stream_handler
        self._identify = identify
        self.log = log
        self.connections: set[TlsTunnelConnection] = set()
        self.counters: dict[str, int] = {"connections": 0, "connections_refused": 0}

    def _protocol(self) -> asyncio.BaseProtocol:
        if self._closing or len(self.connections) >= self.settings.max_connections:
            self.counters["connections_refused"] += 1
            return _Refused()
        try:
            ctx = self._context()
        except Exception as e:
            self.log.error("no tls context for the tunnel", error=repr(e))
            self.counters["connections_refused"] += 1
            return _Refused()
        conn = TlsTunnelConnection(
            is_client=False,
            context=ctx,
            policy=self._policy,
            settings=self.settings,
            stream_handler=self._handler,
            identify=self._identify,
            log=self.log,
        )
        conn.on_closed = self.connections.discard
        self.connections.add(conn)
        self.counters["connections"] += 1
        return conn

    def drain(self) -> None:
        """Stop accepting connections and tell every peer to open no new stream here."""
        self.stop_listening()
        for conn in list(self.connections):
            conn.drain("gateway draining")

    async def aclose(self, grace: float = 1.0) -> None:
        self.stop_listening()
        conns = list(self.connections)
        for conn in conns:
            conn.close("gateway shutting down")
        await self.wait_stopped()


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()


async def connect(
    host: str,
    port: int,
    *,
    context: ssl.SSLContext,
    server_hostname: str,
    policy: PeerPolicy,
    settings: TlsTunnelSettings,
    log: Any = _log,
    identify: Callable[[SpiffeId], str] | None = None,
) -> TlsTunnelConnection:
    """Open, authenticate and wait for the peer's READY (raises TunnelError)."""
    loop = asyncio.get_running_loop()
    limit = settings.handshake_timeout
    try:
        async with asyncio.timeout(limit):
            _, conn = await loop.create_connection(
                lambda: TlsTunnelConnection(
                    is_client=True,
                    context=context,
                    policy=policy,
                    settings=settings,
                    server_hostname=server_hostname,
                    identify=identify,
                    log=log,
                ),
                host,
                port,
            )
            try:
                await conn.wait_connected()
            except BaseException:
                conn.close("handshake failed")
                raise
    except TimeoutError as e:
        raise TunnelTimeoutError(f"TLS tunnel handshake timed out after {limit:g}s") from e
    except OSError as e:
        raise TunnelError(f"cannot connect to {host}:{port}: {e.strerror or e}") from e
    return conn
