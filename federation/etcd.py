"""Opening etcd3aio clients and translating their errors into the `StoreError` family.

This and `federation.store` are the only modules that touch etcd3aio. etcd3aio dials with the
`ipv4:` gRPC scheme (round-robin over all endpoints), which takes IPv4 literals only, so host
names are resolved here; with TLS the first host name becomes the verified server name unless
`server_name` says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio
from etcd3aio import (
    Etcd3Client,
    EtcdConnectionError,
    EtcdError,
    EtcdPermissionDeniedError,
    EtcdTransientError,
    EtcdUnauthenticatedError,
    TokenRefresher,
)

from federation.errors import (
    LeaseLostError,
    StoreAuthError,
    StoreError,
    StoreUnavailableError,
)

__all__ = [
    "Etcd3Client",
    "EtcdCredentials",
    "etcd_client",
    "open_client",
    "parse_endpoint",
    "store_errors",
]

MAX_RECEIVE = 64 * 1024 * 1024
# gRPC re-dials a lost server with exponential backoff up to 120 s by default: after an etcd
# restart of ~20 s the channel would wait ~10 s more before trying again, and every lease
# would lapse meanwhile (issue 15). A refused dial on a LAN costs microseconds, so retry
# every 0.3 s at most.
RECONNECT_BACKOFF = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
)
TOKEN_REFRESH = 120.0  # seconds; etcd's simple tokens live 300 s (--auth-token-ttl)
_UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_AUTH = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
# etcd answers these auth failures with INVALID_ARGUMENT (rpctypes.ErrGRPCAuthFailed, ...).
_AUTH_DETAILS = ("authentication failed", "user name is empty", "invalid auth token")


@contextlib.contextmanager
def store_errors(operation: str) -> Iterator[None]:
    """Translate etcd3aio/gRPC exceptions raised inside the block into `StoreError`s."""
    try:
        yield
    except (EtcdUnauthenticatedError, EtcdPermissionDeniedError) as e:
        raise StoreAuthError(f"{operation}: {e}") from e
    except (EtcdConnectionError, EtcdTransientError) as e:
        raise StoreUnavailableError(f"{operation}: {e}") from e
    except EtcdError as e:
        raise StoreError(f"{operation}: {e}") from e
    except grpc.aio.AioRpcError as e:
        message = f"{operation}: {e.code().name}: {e.details() or ''}"
        if e.code() in _UNAVAILABLE:
            raise StoreUnavailableError(message) from e
        if e.code() in _AUTH or any(text in (e.details() or "") for text in _AUTH_DETAILS):
            raise StoreAuthError(message) from e
        if e.code() == grpc.StatusCode.NOT_FOUND and "lease not found" in (e.details() or ""):
            raise LeaseLostError(message) from e
        raise StoreError(message) from e
    except TimeoutError as e:
        raise StoreUnavailableError(f"{operation}: timed out") from e


@dataclass(frozen=True, slots=True)
class EtcdCredentials:
    """An etcd user (etcd auth); see federation.etcd_auth for the roles fedgate uses."""

    user: str
    password: str = field(repr=False)


class _Client(Etcd3Client):
    """An Etcd3Client whose auth token refresher (if any) stops when the client closes."""

    _refresher: TokenRefresher | None = None

    async def login(self, credentials: EtcdCredentials) -> None:
        refresher = self.token_refresher(
            credentials.user, credentials.password, interval=TOKEN_REFRESH
        )
        await refresher.__aenter__()
        self._refresher = refresher

    async def close(self) -> None:
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            await refresher.__aexit__(None, None, None)
        await super().close()


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """`host:port` -> (host, port); raises `StoreError` naming the bad endpoint."""
    host, sep, port_text = endpoint.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise StoreError(f"etcd endpoint {endpoint!r} is not host:port")
    return host, int(port_text)


async def _resolve(endpoints: Sequence[str]) -> tuple[list[str], str | None]:
    """IPv4 `ip:port` targets for `endpoints`, and the first host name among them (if any)."""
    loop = asyncio.get_running_loop()
    targets: list[str] = []
    first_name: str | None = None
    for endpoint in endpoints:
        host, port = parse_endpoint(endpoint)
        try:
            ipaddress.IPv4Address(host)
            addresses = [host]
        except ValueError:
            first_name = first_name or host
            try:
                infos = await loop.getaddrinfo(host, port, family=socket.AF_INET)
            except OSError as e:
                raise StoreUnavailableError(
                    f"cannot resolve etcd endpoint {endpoint!r}: {e}"
                ) from e
            addresses = sorted({str(info[4][0]) for info in infos})
        targets.extend(f"{a}:{port}" for a in addresses if f"{a}:{port}" not in targets)
    if not targets:
        raise StoreError("no etcd endpoints given")
    return targets, first_name


async def open_client(
    endpoints: Sequence[str],
    *,
    ca_cert: bytes | None = None,
    cert_key: bytes | None = None,
    cert_chain: bytes | None = None,
    server_name: str | None = None,
    check: bool = True,
    connect_timeout: float = 5.0,
    credentials: EtcdCredentials | None = None,
) -> Etcd3Client:
    """A connected etcd3aio client for `endpoints` (`host:port`, round-robin).

    TLS is on when `ca_cert` is given (mutual TLS with `cert_key` + `cert_chain`). With `check`
    the cluster must answer a read within `connect_timeout` seconds, else `StoreUnavailableError`.
    With `credentials` (etcd auth on) the client authenticates and keeps its token fresh until
    `close()`; wrong credentials raise `StoreAuthError`.
    """
    targets, first_name = await _resolve(endpoints)
    tls_name = server_name or (first_name if ca_cert is not None else None)
    client = _Client(
        targets, tls_server_name=tls_name, ca_cert=ca_cert, cert_key=cert_key, cert_chain=cert_chain
    )
    # gRPC's default 4 MiB receive limit is one page of a large catalog or one big watch
    # response; etcd3aio has no option for it (pinned <0.4, so its manager's list is stable).
    client._manager.grpc_options.append(("grpc.max_receive_message_length", MAX_RECEIVE))
    client._manager.grpc_options.extend(RECONNECT_BACKOFF)
    try:
        with store_errors("connect"):
            await client.connect()
            if credentials is not None:
                await client.login(credentials)
            if check:  # Status needs no key permission: any user (or none) may ask
                assert client.maintenance is not None
                await client.maintenance.status(timeout=connect_timeout)
    except BaseException:
        await client.close()
        raise
    return client


@contextlib.asynccontextmanager
async def etcd_client(
    endpoints: Sequence[str],
    *,
    ca_cert: bytes | None = None,
    cert_key: bytes | None = None,
    cert_chain: bytes | None = None,
    server_name: str | None = None,
    check: bool = True,
    connect_timeout: float = 5.0,
    credentials: EtcdCredentials | None = None,
) -> AsyncIterator[Etcd3Client]:
    """`open_client` as an async context manager that closes the client."""
    client = await open_client(
        endpoints,
        ca_cert=ca_cert,
        cert_key=cert_key,
        cert_chain=cert_chain,
        server_name=server_name,
        check=check,
        connect_timeout=connect_timeout,
        credentials=credentials,
    )
    try:
        yield client
    finally:
        await client.close()
