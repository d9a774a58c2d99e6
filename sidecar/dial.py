"""Dialing the mesh from the source sidecar: steps 2-3 of `sidecar.outbound`'s docstring.

`MeshDialer.upstream` makes one per-connection upstream: TCP to the endpoint's inbound port, or
to the local gateway's egress with a `CONNECT` naming service, port and cluster (a `200`
required; a refusal that says the peer cluster is unreachable marks it down in
`sidecar.traffic.peers`); then TLS 1.3 with the pod's SVID (resuming a ticket per destination,
`sidecar.resume`), the server's SPIFFE ID checked against the identities the decision allows,
the stream header sent and a `200` stream reply required. `MeshDialer.multiplexed` opens a
stream of a pooled multiplexed connection (`sidecar.smux_pool`) set up the same way, falling
back to a per-connection upstream. Both return a typed `sidecar.http.exchange.Dialed` (the peer
identity, the ingress's span for tracing, TLS resumption); a failure after the handshake is a
`SetupError` carrying what the handshake learned. What this module does not do: route (the
caller's decision), relay bytes, or retry.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import Awaitable, Callable

import structlog

from ca.errors import VerificationError
from ca.tls import peer_identity
from mesh import telemetry as tm
from mesh.authz import AUTHZ_REFUSAL
from mesh.codec import StreamHeader, encode_header, reply_from_json, split_frame
from mesh.connect import (
    ConnectRequest,
    encode_request,
    parse_response,
    response_peer_unreachable,
    response_traceparent,
    split_head,
)
from mesh.errors import CodecError
from mesh.mux import MuxError
from mesh.naming import SpiffeId
from sidecar.errors import ProxyError
from sidecar.http.exchange import Dialed
from sidecar.pipe import Conn, open_conn
from sidecar.resume import SessionCache
from sidecar.routes import Decision, Local, ServiceRoute
from sidecar.settings import SidecarSettings
from sidecar.smux import ALPN as SMUX_ALPN
from sidecar.smux import SmuxConnection
from sidecar.smux_pool import NotMultiplexedError, SmuxPool, destination_key
from sidecar.state import ProxyState
from sidecar.traffic.peers import PeerHealth

AUTHZ_DENIED = "authorization denied"  # the destination's AuthorizationPolicy refused the stream
_log = structlog.get_logger("fedgate.sidecar")


class MeshDialer:
    """Mesh upstreams for one sidecar's outbound side (TCP, HTTP/1.1 and HTTP/2 pools)."""

    def __init__(
        self,
        settings: SidecarSettings,
        sessions: SessionCache,
        pool: SmuxPool,
        peers: PeerHealth,
    ) -> None:
        self._settings = settings
        self.sessions = sessions
        self.pool = pool
        self.peers = peers

    async def multiplexed(
        self,
        route: ServiceRoute,
        decision: Decision,
        state: ProxyState,
        traceparent: str,
    ) -> Dialed:
        """A stream of a pooled multiplexed connection (`sidecar.smux_pool`), set up like a
        per-connection upstream; that instead when the pool is full or the peer has no smux."""
        s = self._settings
        step = _Step("multiplexed connection")
        key = destination_key(route, decision)
        fallback: list[Dialed] = []  # the dial's upstream when the peer does not multiplex
        dial = functools.partial(
            self._mux_dial, route, decision, state, traceparent, step, fallback
        )
        try:
            async with asyncio.timeout(s.setup_timeout):
                try:
                    pooled = await self.pool.acquire(
                        key, state.mux_ctx, decision.identities.__contains__, dial
                    )
                except NotMultiplexedError:
                    return fallback[0]
                if pooled is not None:
                    try:
                        upstream = pooled.open_stream("sidecar")
                    except MuxError as e:
                        raise ProxyError("smux refused", str(e)) from e
                    step.name = "stream reply"
                    try:
                        await self._stream(upstream, route, decision, traceparent)
                    except BaseException:
                        upstream.reset()
                        raise
                    if pooled.opened == 1 and pooled.tls is not None:  # the reply brought tickets
                        assert state.mux_ctx is not None
                        self.sessions.done(("smux", *key), state.mux_ctx, pooled.tls.obj)
                    return Dialed(upstream, pooled.peer, smux=pooled.id)
        except TimeoutError as e:
            raise ProxyError("timeout", f"{step.name} not done within {s.setup_timeout} s") from e
        return await self.upstream(route, decision, state, traceparent)  # the pool is full

    async def _mux_dial(
        self,
        route: ServiceRoute,
        decision: Decision,
        state: ProxyState,
        traceparent: str,
        step: _Step,
        fallback: list[Dialed],
    ) -> SmuxConnection:
        """A new pooled connection, set up as a per-connection upstream is, offering smux;
        NotMultiplexedError with a ready per-connection upstream (in `fallback`) if the peer
        does not take it."""
        s = self._settings
        ctx = state.mux_ctx
        assert ctx is not None
        dest = ("smux", *destination_key(route, decision))
        dialed, ssl_obj = await self._connect(
            route, decision, state, traceparent, ctx, dest, step, open_conn
        )
        upstream = dialed.conn
        if ssl_obj.selected_alpn_protocol() != SMUX_ALPN:
            step.name = "stream reply"
            try:
                await self._stream(upstream, route, decision, dialed.via or traceparent)
            except BaseException:
                upstream.close()
                raise
            self.sessions.done(dest, ctx, ssl_obj)
            fallback.append(dialed)
            raise NotMultiplexedError(upstream)
        conn = SmuxConnection(
            is_client=True,
            peer=dialed.peer,
            max_streams=s.mux_streams,
            idle_timeout=s.mux_idle_timeout,
            log=_log.bind(pod=s.pod, cluster=s.cluster, hop=tm.SOURCE),
        )
        try:
            conn.adopt(upstream)
        except ConnectionError as e:
            upstream.close()
            raise ProxyError("connection lost", str(e)) from e
        return conn

    async def upstream(
        self,
        route: ServiceRoute,
        decision: Decision,
        state: ProxyState,
        traceparent: str,
        *,
        opener: Callable[[str, int, str, float], Awaitable[Conn]] = open_conn,
    ) -> Dialed:
        """A per-connection upstream: steps 2-3 of the module docstring, ready for the app.
        `traceparent`: the calling span's (for the CONNECT), or ""."""
        s = self._settings
        ctx = state.client_ctx
        assert ctx is not None
        step = _Step("connect")
        if isinstance(decision, Local):
            dest: tuple[object, ...] = (decision.endpoint.address,)
        else:
            dest = (decision.cluster, route.service, route.port.port, decision.labels)
        try:
            async with asyncio.timeout(s.setup_timeout):
                dialed, ssl_obj = await self._connect(
                    route, decision, state, traceparent, ctx, dest, step, opener
                )
                step.name = "stream reply"
                try:
                    tp = dialed.via or traceparent
                    await self._stream(dialed.conn, route, decision, tp)
                except ProxyError as e:
                    dialed.conn.close()
                    raise SetupError(e.reason, e.detail, dialed.tls_resumed, dialed.peer) from e
                except BaseException:
                    dialed.conn.close()
                    raise
                self.sessions.done(dest, ctx, ssl_obj)  # the reply brought the tickets
        except TimeoutError as e:
            raise ProxyError("timeout", f"{step.name} not done within {s.setup_timeout} s") from e
        return dialed

    async def _connect(
        self,
        route: ServiceRoute,
        decision: Decision,
        state: ProxyState,
        traceparent: str,
        ctx: ssl.SSLContext,
        dest: tuple[object, ...],
        step: _Step,
        opener: Callable[[str, int, str, float], Awaitable[Conn]],
    ) -> tuple[Dialed, ssl.SSLObject]:
        """TCP to the endpoint (or the egress and its CONNECT), then TLS 1.3 with `ctx` and the
        server's identity checked against the decision's; the caller bounds it in time."""
        s = self._settings
        step.name = "connect"
        upstream: Conn | None = None
        via = ""
        try:
            if isinstance(decision, Local):
                upstream = await opener(
                    decision.endpoint.address, s.inbound_port, "sidecar", s.connect_timeout
                )
            else:
                cluster = decision.cluster
                egress = decision.egress
                upstream = await opener(egress.host, egress.port, "gateway", s.connect_timeout)
                step.name = "CONNECT"
                request = ConnectRequest(
                    route.service, route.port.port, cluster, traceparent, decision.labels
                )
                upstream.write(encode_request(request))
                head = await upstream.read_frame(split_head, "CONNECT response")
                status, phrase = _parse_connect(head)
                if status != 200:
                    if response_peer_unreachable(head):
                        # The gateway cannot reach that cluster: avoid it for a while,
                        # for every service (sidecar.traffic.peers).
                        self.peers.mark_down(cluster, time.monotonic())
                        raise ProxyError("peer unreachable", f"{status} {phrase}")
                    raise ProxyError("gateway refused", f"{status} {phrase}")
                if traceparent:
                    # The span nearest the destination the tunnel set up (see above).
                    via = response_traceparent(head) or ""
            step.name = "TLS handshake"
            ssl_obj = await upstream.start_tls(
                ctx, server_side=False, session=self.sessions.get(dest, ctx)
            )
            try:
                server = peer_identity(
                    ssl_obj, state.bundle, allowed=decision.identities.__contains__
                )
            except VerificationError as e:
                resumed = ssl_obj.session_reused
                raise SetupError("server identity rejected", str(e), resumed) from e
        except BaseException:
            if upstream is not None:
                upstream.close()
            raise
        return Dialed(upstream, server, via, ssl_obj.session_reused), ssl_obj

    async def _stream(
        self,
        upstream: Conn,
        route: ServiceRoute,
        decision: Decision,
        traceparent: str,
    ) -> None:
        """Send the stream header (with the span nearest the destination: the ingress's on a
        tunnel, else the caller's) and require a `200` stream reply."""
        cluster = self._settings.cluster if isinstance(decision, Local) else decision.cluster
        header = StreamHeader(route.service, route.port.port, cluster, traceparent)
        upstream.write(encode_header(header))
        reply = await upstream.read_frame(split_frame, "stream reply")
        try:
            answer = reply_from_json(reply)
        except CodecError as e:
            raise ProxyError("malformed stream reply", str(e)) from e
        if answer.status != 200:
            denied = answer.status == 403 and answer.reason.startswith(AUTHZ_REFUSAL)
            reason = AUTHZ_DENIED if denied else "destination refused"
            raise ProxyError(reason, f"{answer.status} {answer.reason}")


class SetupError(ProxyError):
    """A mesh upstream that failed after its TLS handshake, with what the handshake learned
    (for the failure's log line)."""

    def __init__(
        self, reason: str, detail: str, tls_resumed: bool, peer: SpiffeId | None = None
    ) -> None:
        super().__init__(reason, detail)
        self.tls_resumed = tls_resumed
        self.peer = peer

    def learned(self) -> dict[str, object]:
        peer = {"peer": self.peer.uri} if self.peer is not None else {}
        return {"tls_resumed": self.tls_resumed, **peer}


class _Step:
    """Which setup step runs, for the timeout's message."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def _parse_connect(head: bytes) -> tuple[int, str]:
    try:
        return parse_response(head)
    except CodecError as e:
        raise ProxyError("malformed CONNECT response", str(e)) from e
