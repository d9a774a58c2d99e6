"""Config distribution: the gRPC servicer of the config streams.

The current snapshot and its subscriptions are `federation.publisher` (re-exported here).

`ConfigDiscoveryServicer` runs one `ServerSession` (federation.api.session) per stream: it
sends a snapshot when the version differs from what the proxy runs, and logs every ACK and
NACK with the node's id, cluster and versions. A replica without a snapshot yet waits up to
`first_snapshot_timeout` and then refuses the stream with UNAVAILABLE, so a proxy fails over to
another replica instead of hanging on one that cannot serve. Who may open a stream is decided
by the `authorize(context)` callable (the lead plugs in ca/'s SPIFFE verifier); it returns an
error text to refuse with PERMISSION_DENIED. Config generation happens elsewhere.

Stalls are made visible and self-healing rather than assumed impossible (docs/controller.md,
"Stalled streams"): every response carries the replica's current version and an idle stream
gets a heartbeat every `heartbeat` seconds, so a proxy can tell that it trails and reconnect;
a write the proxy does not take within `write_timeout` drops the stream (STYLE: drop the slow
stream); and each stream's lag (since when the replica has published a version the proxy
does not run, counted from the offer) is in `PushStats` for metrics and `fedgate status`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import structlog

from federation.aio import wait_event
from federation.api.config_pb2 import ConfigRequest, ConfigResponse
from federation.api.config_pb2_grpc import (
    ConfigDiscoveryServicer as _ServicerBase,
)
from federation.api.config_pb2_grpc import (
    add_ConfigDiscoveryServicer_to_server,
)
from federation.api.session import Ack, Nack, Resync, ServerSession, Stale
from federation.errors import FederationError
from federation.publisher import HISTORY, Published, SnapshotPublisher, Subscription
from federation.pushstats import PushStats, Subscriber
from mesh.tasks import TaskSet

__all__ = [
    "HISTORY",
    "ConfigDiscoveryServicer",
    "ConfigServer",
    "Published",
    "SnapshotPublisher",
    "Subscription",
    "allow_all",
    "serve",
]

_log = structlog.get_logger("fedgate.federation.server")

Context = grpc.aio.ServicerContext[ConfigRequest, ConfigResponse]
Authorizer = Callable[[Context], "str | None"]
MAX_MESSAGE = 64 * 1024 * 1024
HEARTBEAT = 2.0  # seconds: an idle stream is told the current version this often
WRITE_TIMEOUT = 30.0  # seconds: a stream whose proxy does not take a response is dropped


def allow_all(context: Context) -> str | None:
    return None


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class _StreamDroppedError(Exception):
    """A write stalled: end the stream (its status is set already)."""


@dataclass(frozen=True, slots=True)
class _Stream:
    """One open config stream, as its two tasks (take/offer/write and read) share it."""

    context: Context
    session: ServerSession
    subscription: Subscription
    log: Any
    sub: Subscriber
    opened_at: float


class ConfigDiscoveryServicer(_ServicerBase):
    def __init__(
        self,
        publisher: SnapshotPublisher,
        authorize: Authorizer = allow_all,
        *,
        replica: str = "",
        first_snapshot_timeout: float = 10.0,
        heartbeat: float = HEARTBEAT,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self._publisher = publisher
        self._authorize = authorize
        self._replica = replica
        self._first_timeout = first_snapshot_timeout
        self._heartbeat = heartbeat
        self._write_timeout = write_timeout
        self._tasks = TaskSet("config-streams")
        self.acks = 0  # metrics
        self.nacks = 0
        self.resyncs = 0
        self.deltas = 0
        self.fulls = 0
        self.heartbeats = 0
        self.dropped = 0  # streams closed because a write stalled
        self.push = PushStats()  # per-subscriber versions, lag and push latency (metrics)

    def streams(self) -> list[dict[str, Any]]:
        """Every open stream and its lag, the worst first (the controller's admin
        `/streams.json`, which `fedgate status` reads)."""
        now = self._publisher.clock()
        subs = sorted(self.push.subscribers.values(), key=lambda s: (-s.lag(now), s.node))
        return [
            {
                "node": s.node,
                "kind": s.kind,
                "cluster": s.cluster,
                "version": s.version,
                "sent": s.sent,
                "nacked": s.nacked,
                "lag_seconds": round(s.lag(now), 3),
            }
            for s in subs
        ]

    def _current(self) -> str:
        current = self._publisher.published
        return current.version if current is not None else ""

    async def StreamConfig(  # noqa: N802 - the gRPC method name
        self, request_iterator: Any, context: Context
    ) -> None:
        refusal = self._authorize(context)
        if refusal is not None:
            _log.warning("config stream refused", peer=context.peer(), error=refusal)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        if self._publisher.current is None:
            await wait_event(self._publisher.first, self._first_timeout)
            if self._publisher.current is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "controller has no config yet")
        hello = await context.read()
        if not isinstance(hello, ConfigRequest):  # grpc.aio.EOF before any request
            return
        session = ServerSession(hello)
        opened_at = self._publisher.clock()
        log = _log.bind(
            node=session.node.id,
            cluster=session.node.cluster,
            kind=session.node.kind,
            peer=context.peer(),
        )
        log.info("config stream opened", version=hello.version_info, full=hello.full)
        node = session.node
        sub = self.push.opened(node.id, node.kind, node.cluster, hello.version_info)
        try:
            with self._publisher.subscribe(sub) as subscription:
                await self._serve(_Stream(context, session, subscription, log, sub, opened_at))
        except _StreamDroppedError:
            pass  # logged where it happened; the status is set
        finally:
            self.push.closed(sub)
            log.info("config stream closed", version=session.client_version)

    async def _serve(self, stream: _Stream) -> None:
        """Take each offered snapshot and send what the session says, with a heartbeat on an
        idle stream. One `take` lives across heartbeats: an offer made at any point (while
        writing, while waiting, between the two) is in the subscription's slot and wakes it."""
        context, session, subscription = stream.context, stream.session, stream.subscription
        loop = asyncio.get_running_loop()
        reader = self._tasks.spawn(self._read(stream), f"read:{session.node.id}")
        taking: asyncio.Future[Published] | None = None
        last_write = loop.time()
        try:
            while not reader.done():
                if taking is None:
                    taking = asyncio.ensure_future(subscription.next())
                timeout = max(0.0, last_write + self._heartbeat - loop.time())
                await asyncio.wait(
                    {reader, taking}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                response: ConfigResponse | None = None
                if taking.done():
                    item = taking.result()
                    taking = None
                    response = session.offer(item.version, item.full, item.delta)
                    if response is None:
                        if item.version == session.client_version:  # it runs it already
                            stream.sub.running(item.version, self._current(), item.at)
                        continue
                    stream.sub.sent = item.version
                    if response.base_version:
                        self.deltas += 1
                    else:
                        self.fulls += 1
                elif reader.done():
                    break  # the proxy closed its side
                elif session.heartbeats and loop.time() - last_write >= self._heartbeat:
                    response = session.heartbeat(self._current())
                    self.heartbeats += 1
                else:
                    continue
                response.replica = self._replica
                response.current_version = self._current()
                await self._write(context, response, stream.log)
                last_write = loop.time()
        finally:
            for task in (reader, taking):
                if task is not None:
                    task.cancel()

    async def _write(self, context: Context, response: ConfigResponse, log: Any) -> None:
        """Send `response`; a stream that cannot take it within `write_timeout` is dropped
        (the proxy reconnects and gets the current snapshot), never left stalled."""
        write = asyncio.ensure_future(context.write(response))
        # If the stream ends while it waits (a cancelled handler), nobody awaits the write:
        # its ExecuteBatchError must not be logged as never retrieved.
        write.add_done_callback(_retrieve)
        try:
            done, _ = await asyncio.wait({write}, timeout=self._write_timeout)
        finally:
            if not write.done():
                write.cancel()
        if not done:
            self.dropped += 1
            log.warning(
                "config stream dropped: write stalled",
                version=response.version_info or None,
                seconds=self._write_timeout,
            )
            # Not context.abort: its status would queue behind the response the proxy does
            # not take, and the handler (with its subscription) would hang on it. The status
            # set here goes out when it can; the stream's resources go now.
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(
                f"config stream stalled: a response was not taken in {self._write_timeout} s"
            )
            raise _StreamDroppedError
        write.result()  # a failed write (the stream is gone) ends the stream
        if not response.heartbeat:
            log.debug(
                "config sent",
                version=response.version_info,
                delta_from=response.base_version,
                size=len(response.snapshot),
            )

    async def _read(self, stream: _Stream) -> None:
        context, session, subscription = stream.context, stream.session, stream.subscription
        log, sub, opened_at = stream.log, stream.sub, stream.opened_at
        while True:
            try:
                request = await context.read()
            except Exception as e:  # the stream is over (cancelled, server stopped)
                log.debug("config stream read ended", error=repr(e))
                return
            if not isinstance(request, ConfigRequest):  # the proxy half-closed the stream
                return
            event = session.receive(request)
            match event:
                case Ack(version=version):
                    self.acks += 1
                    clock = self._publisher.clock
                    latency = self.push.acked(
                        sub,
                        version,
                        self._publisher.published_at(version),
                        opened_at,
                        clock(),
                        current=self._current(),
                        behind_since=self._publisher.superseded_at(version),
                    )
                    log.info(
                        "config ACK",
                        version=version,
                        push_latency_s=None if latency is None else round(latency, 4),
                    )
                case Nack(rejected=rejected, kept=kept, error=error):
                    self.nacks += 1
                    self.push.nacked(sub, rejected)
                    log.warning("config NACK", version=rejected, kept=kept, error=error)
                case Stale(nonce=nonce):
                    log.debug("stale config request ignored", nonce=nonce)
                case Resync(kept=kept):
                    self.resyncs += 1
                    log.info("config resync requested", kept=kept)
                    # It says what it runs: an ACK the resync made stale may have been lost.
                    sub.running(kept, self._current(), self._publisher.clock())
                    current = self._publisher.published
                    if current is not None:
                        subscription.offer(current)
                case _:
                    raise AssertionError(f"unknown session event {event!r}")


# Proxies ping every 30 s (`federation.api.wire.KEEPALIVE_INTERVAL`) to notice a dead
# controller on an idle stream; gRPC's default (one ping per 5 min without data) would answer
# them with GOAWAY too_many_pings.
MIN_PING_INTERVAL = 10.0


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
    min_ping_interval: float = MIN_PING_INTERVAL,
) -> ConfigServer:
    """Start a gRPC server for `servicer` on `listen` ("127.0.0.1:0" picks a free port).

    `credentials` are the controller's mTLS server credentials; None serves plaintext, which
    only tests on loopback should do. `min_ping_interval` (seconds) is the closest two client
    pings without data may come before GOAWAY too_many_pings: a test scales it down to see
    the policy in seconds rather than tens of seconds.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", round(min_ping_interval * 1000)),
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
