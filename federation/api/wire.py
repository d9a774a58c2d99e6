"""The config stream as `ConfigClient` drives it, over either gRPC client (issue 17).

`federation.api.client.open_stream(wire, ...)` returns a `ConfigStream`: `write` a request,
`read` a response (None once the controller has ended the stream cleanly), `aclose`. Each
implementation translates its own failures into `StreamFailedError`, so the client's session
logic is the same over both:
- "h2" (the default): the h2 + protobuf client of `ca.h2grpc`, which never imports grpc
  (`federation.api.h2_stream`), about 16 MiB and 7-9 threads lighter (docs/footprint.md);
- "grpcio": grpc.aio, the C core (`federation.api.grpcio_stream`).
Only the chosen implementation is imported.
"""

from __future__ import annotations

from typing import Literal, Protocol

from federation.api.config_pb2 import ConfigRequest, ConfigResponse

Wire = Literal["grpcio", "h2"]
WIRES: tuple[Wire, ...] = ("h2", "grpcio")  # the first is the default
METHOD = "/fedgate.config.v1.ConfigDiscovery/StreamConfig"
MAX_MESSAGE = 64 * 1024 * 1024  # a large federation's snapshot outgrows gRPC's 4 MiB default
# Notice a dead controller on an idle stream: ping every 30 s, also without data;
# `federation.server.serve` permits one every 10 s (closer ones earn GOAWAY too_many_pings).
KEEPALIVE_INTERVAL = 30.0
KEEPALIVE_TIMEOUT = 10.0


class StreamFailedError(Exception):
    """The stream failed: a status from the controller, or the connection is gone."""


class ConfigStream(Protocol):
    async def write(self, request: ConfigRequest) -> None: ...
    async def read(self) -> ConfigResponse | None: ...
    async def aclose(self) -> None: ...
