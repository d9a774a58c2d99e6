"""The asyncio driver of the h2 gRPC client (`mesh.grpc_h2`): one TLS connection, its calls.

The cheap way for a proxy to speak gRPC (issue 17, docs/footprint.md): `h2` and protobuf,
without grpcio's C core and its threads. It talks to the unmodified grpcio servers of the CA
and the controller. It lives in ca/ because ca is the lowest layer that may do I/O and both of
its users may import it: `ca.client` (SVID issuance) and `federation.api.client` (the config
stream).

`TlsCredentials` is what a grpcio `ssl_channel_credentials` held: the roots that vouch for the
server and, for mTLS, the client's chain and key. The server's name is checked as grpcio's
`ssl_target_name_override` does (a DNS SAN), with ALPN `h2` as gRPC requires.

It deliberately does not do name resolution policies, load balancing, retries, compression,
deadlines propagated as `grpc-timeout` or several connections: callers own reconnecting.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from dataclasses import dataclass

from ca.memkey import load_pem_chain
from mesh import grpcwire
from mesh.grpc_h2 import (
    KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT,
    CallEnded,
    ConnectionClosedError,
    GrpcClientConnection,
    MessageReceived,
)

__all__ = ["H2Call", "H2Channel", "RpcError", "TlsCredentials"]

READ_SIZE = 65536


class RpcError(Exception):
    """A call that ended with a status other than OK (or never started: UNAVAILABLE)."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(f"{grpcwire.code_name(code)}: {details}")
        self.code = code
        self.details = details

    @property
    def code_name(self) -> str:
        return grpcwire.code_name(self.code)


@dataclass(frozen=True, slots=True)
class TlsCredentials:
    root_pem: bytes
    cert_pem: bytes = b""
    key_pem: bytes = b""

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.root_pem.decode())
        ctx.check_hostname = True  # the server name (e.g. controller.<domain>) is its identity
        ctx.set_alpn_protocols(["h2"])
        if self.cert_pem:
            load_pem_chain(ctx, self.cert_pem, self.key_pem)
        return ctx


class H2Call:
    """One gRPC call: `write` messages, `read` them until None (status OK) or `RpcError`."""

    def __init__(self, channel: H2Channel, stream_id: int) -> None:
        self._channel = channel
        self._id = stream_id
        self._messages: collections.deque[bytes] = collections.deque()
        self._ended: CallEnded | None = None
        self._wake = asyncio.Event()

    async def write(self, message: bytes, end: bool = False) -> None:
        if self._ended is not None:  # the server ended the call (even with OK): nothing to send
            raise RpcError(self._ended.code, f"call already ended: {self._ended.details}")
        try:
            self._channel.core.send_message(self._id, message, end)
        except ConnectionClosedError as e:
            raise RpcError(grpcwire.UNAVAILABLE, str(e)) from e
        await self._channel.flush()

    async def read(self) -> bytes | None:
        while not self._messages:
            if self._ended is not None:
                if self._ended.code == grpcwire.OK:
                    return None
                raise _error(self._ended)
            self._wake.clear()
            await self._wake.wait()
        message = self._messages.popleft()
        self._channel.core.delivered(self._id)
        self._channel.flush_nowait()
        return message

    def cancel(self) -> None:
        if self._ended is None:
            self._ended = CallEnded(self._id, grpcwire.CANCELLED, "cancelled by the client")
            self._channel.core.cancel(self._id)
            self._channel.flush_nowait()

    def _message(self, message: bytes) -> None:
        self._messages.append(message)
        self._wake.set()

    def _end(self, ended: CallEnded) -> None:
        if self._ended is None:
            self._ended = ended
        self._wake.set()


class H2Channel:
    """One HTTP/2 connection to `target` and the calls on it; `connect`, then `call`."""

    def __init__(
        self,
        core: GrpcClientConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.core = core
        self._reader = reader
        self._writer = writer
        self._calls: dict[int, H2Call] = {}
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._task = asyncio.create_task(self._read_loop(), name=f"h2grpc {core!r}")

    @classmethod
    async def connect(
        cls,
        target: str,
        credentials: TlsCredentials | None,
        server_name: str | None = None,
        *,
        max_message: int = 4 * 1024 * 1024,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        connect_timeout: float = 20.0,
    ) -> H2Channel:
        """Connected, TLS done, preface sent; `RpcError(UNAVAILABLE)` if any of that fails
        (a refused connection, a server whose certificate does not name `server_name`)."""
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        ctx = credentials.context() if credentials is not None else None
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    int(port),
                    ssl=ctx,
                    server_hostname=(server_name or host) if ctx is not None else None,
                    limit=READ_SIZE,
                )
        except (OSError, ssl.SSLError, TimeoutError, ValueError) as e:
            raise RpcError(grpcwire.UNAVAILABLE, f"cannot connect to {target}: {e}") from e
        core = GrpcClientConnection(
            server_name or target,
            scheme="https" if ctx is not None else "http",
            max_message=max_message,
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
        )
        channel = cls(core, reader, writer)
        core.initiate(channel._loop.time())
        await channel.flush()
        return channel

    def call(self, path: str) -> H2Call:
        try:
            stream_id = self.core.start_call(path)
        except ConnectionClosedError as e:
            raise RpcError(grpcwire.UNAVAILABLE, str(e)) from e
        call = H2Call(self, stream_id)
        self._calls[stream_id] = call
        self.flush_nowait()
        return call

    async def unary(self, path: str, request: bytes) -> bytes:
        call = self.call(path)
        try:
            await call.write(request, end=True)
            response = await call.read()
            if response is None:
                raise RpcError(grpcwire.INTERNAL, "no response message")
            if await call.read() is not None:
                raise RpcError(grpcwire.INTERNAL, "more than one response message")
            return response
        finally:
            call.cancel()

    async def aclose(self) -> None:
        self.core.close()
        self.flush_nowait()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._shutdown("channel closed")

    async def __aenter__(self) -> H2Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- the driver --------------------------------------------------------------------------

    def flush_nowait(self) -> None:
        data = self.core.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)
        self._dispatch()
        self._arm()

    async def flush(self) -> None:
        self.flush_nowait()
        try:
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as e:
            self.core.connection_lost(f"connection lost: {e}")
            self._dispatch()

    async def _read_loop(self) -> None:
        reason = "connection closed by the server"
        try:
            while not self.core.closed_reason:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    break
                self.core.receive_data(data, self._loop.time())
                self.flush_nowait()
        except (OSError, ssl.SSLError) as e:
            reason = f"connection lost: {e}"
        except Exception as e:  # a bug here must end the calls, not leave them waiting
            reason = f"h2 gRPC driver failed: {e!r}"
        self._shutdown(self.core.closed_reason or reason)

    def _shutdown(self, reason: str) -> None:
        self.core.connection_lost(reason)
        self._dispatch()
        if self._timer is not None:
            self._timer.cancel()
        if not self._writer.is_closing():
            self._writer.close()

    def _dispatch(self) -> None:
        while (event := self.core.next_event()) is not None:
            match event:
                case MessageReceived(stream_id=sid, message=message):
                    if (call := self._calls.get(sid)) is not None:
                        call._message(message)
                case CallEnded(stream_id=sid):
                    if (call := self._calls.pop(sid, None)) is not None:
                        call._end(event)
                case _:
                    raise AssertionError(f"unknown h2 gRPC event {event!r}")

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.core.get_timer()
        if when is not None:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.core.handle_timer(self._loop.time())
        self.flush_nowait()
        if self.core.closed_reason:
            self._shutdown(self.core.closed_reason)


def _error(ended: CallEnded) -> RpcError:
    return RpcError(ended.code, ended.details)
