"""The thin config-stream client every sidecar, gateway and agent uses.

`ConfigClient.snapshots()` yields each new snapshot the controller sends, after ACKing it;
a response that does not decode (or that `validate` refuses) is NACKed with the reason and the
last good snapshot stays in force. Deltas are applied to the last good snapshot (a delta
against another version asks for a full resync).

Several controller replicas: `target` may list several addresses (a sequence, or
"host:port,host:port"). The client starts at a random one (spreading proxies over replicas)
and, when its stream fails, moves on to the next at once; only after a whole round of failures
does it back off (0.2 s doubling to 5 s, with jitter, reset once a response arrives). Every new
stream announces the last good version, and versions are equal on every replica, so failing
over sends nothing unless the config changed meanwhile. The proxy keeps routing on its last
good snapshot the whole time.

A stream that stalls is dropped, whatever the cause: when the controller's current version
(every response and heartbeat names it) has been one this proxy neither runs nor refused for
`resync_after` seconds, or when nothing at all arrives for `silence_limit` seconds (the
controller sends a heartbeat every 2 s), the client reconnects (to the next replica, if there
are several) and asks for the full snapshot. `lag_seconds` is how long it has trailed so far.

Session rules live in `federation.api.session`; credentials (mTLS with the proxy's SVID) are the
caller's business. `credentials=None` means a plaintext channel, for tests on loopback only.

`wire` picks the gRPC client underneath (`federation.api.wire`): "grpcio" (grpc.aio, with
`grpc.ChannelCredentials`) or "h2" (h2 + protobuf, with `ca.h2grpc.TlsCredentials`; grpc is
never imported). The session logic here is the same for both.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING

import structlog

from federation.api.config_pb2 import ConfigRequest, ConfigResponse
from federation.api.session import (
    Accepted,
    ClientSession,
    Heartbeat,
    NodeInfo,
    Rejected,
    ResyncNeeded,
    Validator,
)
from federation.api.wire import (
    MAX_MESSAGE,
    WIRES,
    ConfigStream,
    StreamFailedError,
    Wire,
)
from mesh.model import Snapshot

if TYPE_CHECKING:
    import grpc

    from ca.h2grpc import TlsCredentials

__all__ = ["MAX_MESSAGE", "ConfigClient", "NodeInfo"]

_log = structlog.get_logger("fedgate.federation.api.client")

BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0
RESYNC_AFTER = 5.0  # seconds trailing the controller's current version before a full resync
SILENCE_LIMIT = 10.0  # seconds without any message (heartbeats come every 2 s) before one


class _StreamEndedError(Exception):
    """The controller closed the stream; we reconnect."""


class _StreamStalledError(_StreamEndedError):
    """The stream trails the controller or went silent; we reconnect for the full snapshot."""


class ConfigClient:
    """The config stream of one proxy.

    Name the proxy with `node=NodeInfo(...)` or with `node_id=`, `cluster=`, `kind=`.
    `credentials` are the proxy's mTLS channel credentials; a plaintext channel needs an
    explicit `insecure=True` (loopback tests only), so a missing credential never silently
    downgrades the stream.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        node: NodeInfo | None = None,
        credentials: grpc.ChannelCredentials | TlsCredentials | None = None,
        server_name_override: str | None = None,
        *,
        node_id: str | None = None,
        cluster: str | None = None,
        kind: str = "sidecar",
        insecure: bool = False,
        validate: Validator | None = None,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        rng: random.Random | None = None,
        resync_after: float = RESYNC_AFTER,
        silence_limit: float = SILENCE_LIMIT,
        wire: Wire = "h2",
    ) -> None:
        if node is None:
            if not node_id or not cluster:
                raise ValueError("ConfigClient needs node=NodeInfo(...) or node_id= and cluster=")
            node = NodeInfo(node_id, cluster, kind)
        elif node_id is not None or cluster is not None:
            raise ValueError("pass either node= or node_id=/cluster=, not both")
        if credentials is None and not insecure:
            raise ValueError("ConfigClient needs channel credentials (insecure=True for tests)")
        _check_credentials(wire, credentials)
        targets = target.split(",") if isinstance(target, str) else list(target)
        self._targets = [t.strip() for t in targets if t.strip()]
        if not self._targets:
            raise ValueError("ConfigClient needs at least one controller address")
        self._wire: Wire = wire
        self._node = node
        self._credentials = credentials
        self._server_name = server_name_override
        self._session = ClientSession(node, validate)
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._resync_after = resync_after
        self._silence_limit = silence_limit
        self._rng = rng or random.Random()
        self._index = self._rng.randrange(len(self._targets))
        self._log = _log.bind(node=node.id, cluster=node.cluster)
        self.reconnects = 0  # metrics
        self.failovers = 0
        self.nacks = 0
        self.resyncs = 0
        self.stalls = 0  # streams dropped because they trailed or went silent
        self.replica = ""  # the controller replica that sent the last response

    @property
    def node(self) -> NodeInfo:
        return self._node

    def set_credentials(self, credentials: grpc.ChannelCredentials | TlsCredentials) -> None:
        """Use `credentials` from the next (re)connect on (a renewed SVID); the stream that
        is up keeps the TLS session it authenticated with."""
        if self._credentials is None:
            raise ValueError("an insecure ConfigClient cannot switch to TLS")
        _check_credentials(self._wire, credentials)
        self._credentials = credentials

    @property
    def latest(self) -> Snapshot | None:
        """The last snapshot accepted (None before the first)."""
        return self._session.latest

    @property
    def target(self) -> str:
        """The controller address in use (or tried next)."""
        return self._targets[self._index]

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self._targets)

    @property
    def deltas(self) -> int:
        return self._session.deltas

    @property
    def lag_seconds(self) -> float:
        """How long the controller's current version has been one we neither run nor refused."""
        return self._session.trailing_for(time.monotonic())

    async def snapshots(self) -> AsyncGenerator[Snapshot, None]:
        """Each new good snapshot, for ever; reconnects (and fails over) on its own."""
        delay = self._backoff_initial
        failed_in_a_row = 0
        full = False  # the next hello asks for the full snapshot (after a stall)
        while True:
            target = self._targets[self._index]
            call: ConfigStream | None = None
            try:
                call = await open_stream(self._wire, target, self._credentials, self._server_name)
                await _send(call, self._session.hello(full=full))
                full = False
                while True:
                    response = await self._read(call)
                    delay = self._backoff_initial
                    failed_in_a_row = 0
                    self.replica = response.replica or target
                    outcome = self._session.receive(response)
                    self._session.observe(response.current_version, time.monotonic())
                    match outcome:
                        case Heartbeat():
                            pass
                        case Accepted(snapshot=snapshot, ack=ack):
                            self._log.info("config accepted", version=snapshot.version)
                            # Accepted (and applied, when `validate` applies) whether or not
                            # the ACK gets out: the caller hears of it either way.
                            ack_failed = await _try_send(call, ack)
                            yield snapshot
                            if ack_failed is not None:
                                raise ack_failed
                        case Rejected(error=error, nack=nack):
                            self.nacks += 1
                            self._log.warning(
                                "config rejected",
                                version=response.version_info,
                                kept=self._session.version,
                                error=error,
                            )
                            await _send(call, nack)
                        case ResyncNeeded(base=base, request=request):
                            self.resyncs += 1
                            self._log.info("config delta base mismatch, resync", base=base)
                            await _send(call, request)
                        case _:
                            raise AssertionError(f"unknown session outcome {outcome!r}")
            except _StreamStalledError as e:
                self.stalls += 1
                full = True
                self._log.warning(
                    "config stream stalled, resyncing",
                    target=target,
                    error=str(e),
                    version=self._session.version,
                )
            except (StreamFailedError, _StreamEndedError) as e:
                self._log.warning("config stream failed, reconnecting", target=target, error=str(e))
            except Exception as e:  # a bug must not end the config stream for good
                self._log.exception(
                    "config stream broke, reconnecting", target=target, error=repr(e)
                )
            finally:
                if call is not None:
                    await call.aclose()
            self.reconnects += 1
            failed_in_a_row += 1
            if len(self._targets) > 1:
                self._index = (self._index + 1) % len(self._targets)
                self.failovers += 1
            if failed_in_a_row < len(self._targets):
                # Another replica may well be up: try it almost at once (a little jitter so
                # thousands of proxies do not arrive in the same millisecond).
                await asyncio.sleep(self._backoff_initial * self._rng.uniform(0.0, 0.25))
                continue
            failed_in_a_row = 0
            await asyncio.sleep(delay * self._rng.uniform(0.5, 1.0))
            delay = min(delay * 2, self._backoff_max)

    async def _read(self, call: ConfigStream) -> ConfigResponse:
        """The next response; `_StreamStalledError` once the stream has trailed the
        controller's version for `resync_after` s or been silent for `silence_limit` s."""
        trailing = self._session.trailing_for(time.monotonic())
        if trailing >= self._resync_after:
            raise _StreamStalledError(f"trailing the controller's version for {trailing:.1f} s")
        # A controller that does not name its version sends no heartbeats either: an idle
        # stream to it is silent by design (keepalive still notices a dead one).
        timeout = self._silence_limit if self._session.server_reports else None
        if trailing > 0:
            left = self._resync_after - trailing
            timeout = left if timeout is None else min(timeout, left)
        read = asyncio.ensure_future(call.read())
        try:
            # asyncio.wait, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # races its timeout (federation.aio says more).
            done, _ = await asyncio.wait({read}, timeout=timeout)
        finally:
            if not read.done():
                read.cancel()
        if not done:
            if timeout is not None and timeout < self._silence_limit:
                raise _StreamStalledError(
                    f"trailing the controller's version for {self._resync_after:.1f} s"
                )
            raise _StreamStalledError(f"nothing from the controller for {timeout:.1f} s")
        response = read.result()
        if response is None:
            raise _StreamEndedError("controller closed the config stream")
        return response


async def _send(call: ConfigStream, request: ConfigRequest) -> None:
    """Write `request`; a stream that has ended meanwhile raises `StreamFailedError`."""
    await call.write(request)


async def _try_send(call: ConfigStream, request: ConfigRequest) -> StreamFailedError | None:
    """`_send`, returning the error instead of raising it."""
    try:
        await _send(call, request)
    except StreamFailedError as e:
        return e
    return None


async def open_stream(
    wire: Wire,
    target: str,
    credentials: grpc.ChannelCredentials | TlsCredentials | None,
    server_name: str | None,
) -> ConfigStream:
    if wire == "h2":
        from federation.api.h2_stream import H2Stream

        return await H2Stream.open(target, credentials, server_name)  # type: ignore[arg-type]
    if wire == "grpcio":
        from federation.api.grpcio_stream import GrpcioStream

        return GrpcioStream(target, credentials, server_name)  # type: ignore[arg-type]
    raise ValueError(f"unknown gRPC client {wire!r} (one of {', '.join(WIRES)})")


def _check_credentials(wire: Wire, credentials: object) -> None:
    """Refuse at once what would otherwise fail on every reconnect: an unknown client, or the
    other client's kind of credentials."""
    if wire not in WIRES:
        raise ValueError(f"unknown gRPC client {wire!r} (one of {', '.join(WIRES)})")
    if credentials is None:
        return
    is_tls = type(credentials).__name__ == "TlsCredentials"  # no import of either client here
    if (wire == "h2") != is_tls:
        want = "ca.h2grpc.TlsCredentials" if wire == "h2" else "grpc.ChannelCredentials"
        raise ValueError(f"the {wire} client needs {want}, not {type(credentials).__name__}")
