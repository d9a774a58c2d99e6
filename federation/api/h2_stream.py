"""The config stream over the h2 gRPC client (`federation.api.wire` says when this one is used).

The same wire contract as grpc.aio: the controller's unmodified grpcio server cannot tell them
apart. The connection is the stream's own (one per attempt), as with grpcio's channel here.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from ca.h2grpc import H2Call, H2Channel, RpcError, TlsCredentials
from federation.api.config_pb2 import ConfigRequest, ConfigResponse
from federation.api.wire import (
    KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT,
    MAX_MESSAGE,
    METHOD,
    StreamFailedError,
)


class H2Stream:
    def __init__(self, channel: H2Channel, call: H2Call) -> None:
        self._channel = channel
        self._call = call

    @classmethod
    async def open(
        cls, target: str, credentials: TlsCredentials | None, server_name: str | None
    ) -> H2Stream:
        try:
            channel = await H2Channel.connect(
                target,
                credentials,
                server_name,
                max_message=MAX_MESSAGE,
                keepalive_interval=KEEPALIVE_INTERVAL,
                keepalive_timeout=KEEPALIVE_TIMEOUT,
            )
        except RpcError as e:
            raise StreamFailedError(str(e)) from e
        try:
            return cls(channel, channel.call(METHOD))
        except RpcError as e:
            await channel.aclose()
            raise StreamFailedError(str(e)) from e

    async def write(self, request: ConfigRequest) -> None:
        try:
            await self._call.write(request.SerializeToString())
        except RpcError as e:
            raise StreamFailedError(str(e)) from e

    async def read(self) -> ConfigResponse | None:
        try:
            data = await self._call.read()
        except RpcError as e:
            raise StreamFailedError(str(e)) from e
        if data is None:
            return None
        try:
            return ConfigResponse.FromString(data)
        except DecodeError as e:
            # Not the session's NACK case (that is a well-formed response it refuses): bytes
            # that are no ConfigResponse are a broken stream, as grpcio's deserializer says.
            raise StreamFailedError(f"INTERNAL: undecodable response: {e}") from e

    async def aclose(self) -> None:
        self._call.cancel()
        await self._channel.aclose()
