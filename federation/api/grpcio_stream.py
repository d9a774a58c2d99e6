"""The config stream over grpc.aio (`federation.api.wire` says when this one is used)."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio

from federation.api.config_pb2 import ConfigRequest, ConfigResponse
from federation.api.config_pb2_grpc import ConfigDiscoveryStub
from federation.api.wire import (
    KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT,
    MAX_MESSAGE,
    StreamFailedError,
)


class GrpcioStream:
    def __init__(
        self, target: str, credentials: grpc.ChannelCredentials | None, server_name: str | None
    ) -> None:
        options: list[tuple[str, str | int]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.keepalive_time_ms", int(KEEPALIVE_INTERVAL * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT * 1000)),
            # gRPC stops after 2 pings without data by default; we keep pinging.
            ("grpc.http2.max_pings_without_data", 0),
        ]
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._call = ConfigDiscoveryStub(self._channel).StreamConfig()

    async def write(self, request: ConfigRequest) -> None:
        """grpc.aio raises asyncio.InvalidStateError ("RPC already finished") for a write on a
        call whose status has arrived: a stream the controller (or the connection) ended
        between our read and our answer. Before issue 15 that escaped `snapshots()` and ended
        the proxy's config stream for good, silently."""
        try:
            await self._call.write(request)
        except asyncio.InvalidStateError as e:
            raise StreamFailedError(f"the config stream ended before our answer: {e}") from e
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
            raise StreamFailedError(_describe(e)) from e

    async def read(self) -> ConfigResponse | None:
        try:
            response = await self._call.read()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
            raise StreamFailedError(_describe(e)) from e
        return response if isinstance(response, ConfigResponse) else None  # grpc.aio.EOF

    async def aclose(self) -> None:
        self._call.cancel()
        await self._channel.close(None)


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details() or ''}"
    return str(e)
