"""Config distribution: the current snapshot, its subscribers, and the gRPC servicer.

`SnapshotPublisher` holds the current snapshot (encoded once) and every open stream's
subscription. Each subscription is an asyncio.Queue(maxsize=1) whose overflow policy is
"keep the newest": a slow stream is never fed a backlog, it gets the latest snapshot when it
is ready again, and `update()` never waits for anyone. `superseded` counts the snapshots a slow
stream never saw.

`ConfigDiscoveryServicer` runs one `ServerSession` (federation.api.session) per stream: it
sends a snapshot when the version differs from what the proxy runs, and logs every ACK and
NACK with the node's id, cluster and versions. Who may open a stream is decided by the
`authorize(context)` callable (the lead plugs in ca/'s SPIFFE verifier); it returns an error
text to refuse with PERMISSION_DENIED. Config generation happens elsewhere (federation.generate).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import structlog

from federation.api.config_pb2 import ConfigRequest, ConfigResponse
from federation.api.config_pb2_grpc import (
    ConfigDiscoveryServicer as _ServicerBase,
)
from federation.api.config_pb2_grpc import (
    add_ConfigDiscoveryServicer_to_server,
)
from federation.api.session import Ack, Nack, ServerSession, Stale
from federation.errors import FederationError
from mesh.codec import dumps, snapshot_to_json
from mesh.model import Snapshot
from mesh.tasks import TaskSet

_log = structlog.get_logger("fedgate.federation.server")

Context = grpc.aio.ServicerContext[ConfigRequest, ConfigResponse]
Authorizer = Callable[[Context], "str | None"]
MAX_MESSAGE = 64 * 1024 * 1024


def allow_all(context: Context) -> str | None:
    return None


@dataclass(frozen=True, slots=True)
class Published:
    snapshot: Snapshot
    payload: bytes  # mesh.codec.dumps(snapshot_to_json(snapshot)), encoded once for every stream


class Subscription:
    """One stream's view of the publisher: the newest snapshot it has not taken yet."""

    def __init__(self, publisher: SnapshotPublisher) -> None:
        self._publisher = publisher
        self._queue: asyncio.Queue[Published] = asyncio.Queue(maxsize=1)
        self.superseded = 0  # metric: snapshots replaced before this stream took them

    def offer(self, item: Published) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.superseded += 1
            self._publisher.superseded += 1
        self._queue.put_nowait(item)

    async def next(self) -> Published:
        return await self._queue.get()

    def close(self) -> None:
        self._publisher._subscriptions.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SnapshotPublisher:
    def __init__(self) -> None:
        self._current: Published | None = None
        self._subscriptions: set[Subscription] = set()
        self.superseded = 0  # metric, summed over every subscription

    @property
    def current(self) -> Snapshot | None:
        return self._current.snapshot if self._current is not None else None

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def update(self, snapshot: Snapshot) -> bool:
        """Make `snapshot` current and offer it to every stream; False if the version is same."""
        if self._current is not None and self._current.snapshot.version == snapshot.version:
            return False
        self._current = Published(snapshot, dumps(snapshot_to_json(snapshot)))
        for subscription in self._subscriptions:
            subscription.offer(self._current)
        return True

    def subscribe(self) -> Subscription:
        subscription = Subscription(self)
        if self._current is not None:
            subscription.offer(self._current)
        self._subscriptions.add(subscription)
        return subscription


class ConfigDiscoveryServicer(_ServicerBase):
    def __init__(self, publisher: SnapshotPublisher, authorize: Authorizer = allow_all) -> None:
        self._publisher = publisher
        self._authorize = authorize
        self._tasks = TaskSet("config-streams")
        self.acks = 0  # metrics
        self.nacks = 0

    async def StreamConfig(  # noqa: N802 - the gRPC method name
        self, request_iterator: Any, context: Context
    ) -> None:
        refusal = self._authorize(context)
        if refusal is not None:
            _log.warning("config stream refused", peer=context.peer(), error=refusal)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        hello = await context.read()
        if not isinstance(hello, ConfigRequest):  # grpc.aio.EOF before any request
            return
        session = ServerSession(hello)
        log = _log.bind(
            node=session.node.id,
            cluster=session.node.cluster,
            kind=session.node.kind,
            peer=context.peer(),
        )
        log.info("config stream opened", version=hello.version_info)
        reader = self._tasks.spawn(self._read(context, session, log), f"read:{session.node.id}")
        taking: asyncio.Future[Published] | None = None
        try:
            with self._publisher.subscribe() as subscription:
                while not reader.done():
                    taking = asyncio.ensure_future(subscription.next())
                    await asyncio.wait({reader, taking}, return_when=asyncio.FIRST_COMPLETED)
                    if not taking.done():
                        break  # the proxy closed its side
                    item = taking.result()
                    response = session.offer(item.snapshot.version, item.payload)
                    if response is not None:
                        await context.write(response)
                        log.debug("config sent", version=response.version_info)
        finally:
            for task in (reader, taking):
                if task is not None:
                    task.cancel()
            log.info("config stream closed", version=session.client_version)

    async def _read(self, context: Context, session: ServerSession, log: Any) -> None:
        while True:
            request = await context.read()
            if not isinstance(request, ConfigRequest):  # the proxy half-closed the stream
                return
            event = session.receive(request)
            match event:
                case Ack(version=version):
                    self.acks += 1
                    log.info("config ACK", version=version)
                case Nack(rejected=rejected, kept=kept, error=error):
                    self.nacks += 1
                    log.warning("config NACK", version=rejected, kept=kept, error=error)
                case Stale(nonce=nonce):
                    log.debug("stale config request ignored", nonce=nonce)
                case _:
                    raise AssertionError(f"unknown session event {event!r}")


@dataclass(frozen=True, slots=True)
class ConfigServer:
    server: grpc.aio.Server
    port: int

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.server.stop(grace)


async def serve(
    servicer: ConfigDiscoveryServicer,
    listen: str,
    credentials: grpc.ServerCredentials | None,
) -> ConfigServer:
    """Start a gRPC server for `servicer` on `listen` ("127.0.0.1:0" picks a free port).

    `credentials` are the controller's mTLS server credentials; None serves plaintext, which
    only tests on loopback should do.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.keepalive_time_ms", 30_000),
            # Proxies ping every 30 s to notice a dead controller on an idle stream; gRPC's
            # default (one ping per 5 min without data) would answer with GOAWAY too_many_pings.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
    )
    add_ConfigDiscoveryServicer_to_server(servicer, server)
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as e:
        raise FederationError(f"config server cannot listen on {listen}: {e}") from e
    if port == 0:
        raise FederationError(f"config server cannot listen on {listen}")
    await server.start()
    _log.info("config server listening", listen=listen, port=port, tls=credentials is not None)
    return ConfigServer(server, port)
