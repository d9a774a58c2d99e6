"""A loopback rig: source sidecar -> (fake gateway) -> destination sidecars -> tiny apps.

Everything listens on 127.0.0.0/8 addresses (each pod its own address), so no namespace or
root is needed. SO_ORIGINAL_DST is replaced by a table keyed by the app client's source port.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from dataclasses import dataclass, field
from typing import Any

from ca.bundle import TrustBundle
from mesh.connect import encode_response, parse_request, split_head
from mesh.model import Snapshot
from mesh.peerhealth import RESPONSE_HEAD, encode_report, is_request
from sidecar.sidecar import Sidecar, SidecarSettings
from tests.sidecar.conftest import EAST, WEST, Pki, cluster, endpoint, snapshot, spiffe

VIP = "127.77.0.10"


def same_port(*hosts: str) -> int:
    """A TCP port currently free on every one of `hosts`."""
    for _ in range(100):
        socks = [socket.socket()]
        try:
            socks[0].bind((hosts[0], 0))
            port = int(socks[0].getsockname()[1])
            for h in hosts[1:]:
                s = socket.socket()
                socks.append(s)
                s.bind((h, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no common free port")


class App:
    """Echoes every chunk; after the client's EOF says `<name>:bye` and closes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections = 0
        self.active = 0
        self.server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.active += 1
        self._writers.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write(f"{self.name}:bye".encode())
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.active -= 1
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for writer in list(self._writers):
            writer.transport.abort()


@dataclass
class FakeGateway:
    """The local gateway's egress: parses CONNECT, answers, and splices to a target inbound."""

    targets: dict[str, tuple[str, int]] = field(default_factory=dict)
    refuse: str = ""
    unreachable: bool = False  # refusals say the peer cluster's gateway is unreachable
    requests: list[Any] = field(default_factory=list)
    server: asyncio.Server | None = None
    watchers: int = 0  # peer-health feeds subscribed (mesh.peerhealth)
    _feeds: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return "127.0.0.1", int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_writer: asyncio.StreamWriter | None = None
        try:
            buf = b""
            while (split := split_head(buf)) is None:
                chunk = await reader.read(4096)
                if not chunk:
                    return
                buf += chunk
            head, rest = split
            if is_request(head):  # a sidecar's peer-health feed: nothing is ever down here
                self.watchers += 1
                self._feeds.add(writer)
                writer.write(RESPONSE_HEAD + encode_report(frozenset(), 0))
                await reader.read()  # until the sidecar leaves
                self._feeds.discard(writer)
                return
            request = parse_request(head)
            self.requests.append(request)
            if self.refuse:
                status = 502 if self.unreachable else 503
                writer.write(
                    encode_response(status, self.refuse, peer_unreachable=self.unreachable)
                )
                return
            up_reader, up_writer = await asyncio.open_connection(*self.targets[request.cluster])
            writer.write(encode_response(200, "OK"))
            up_writer.write(rest)
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(OSError):  # ConnectionError, ENOTCONN
                        await w.wait_closed()

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for writer in list(self._feeds):
            writer.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except ConnectionError:
        writer.transport.abort()


@dataclass
class Rig:
    pki: Pki
    source: Sidecar
    east: Sidecar  # payments-0 in east, at 127.0.0.2
    west: Sidecar  # payments-w0 in west, at 127.0.0.3
    gateway: FakeGateway
    apps: dict[str, App]
    app_port: int
    inbound_port: int
    egress: tuple[str, int]
    dsts: dict[int, tuple[str, int]] = field(default_factory=dict)

    def snapshot(self, **kw: Any) -> Snapshot:
        defaults: dict[str, Any] = {
            "clusters": (cluster("east", self.egress), cluster("west", ("127.0.0.1", 1))),
            "endpoints": (
                endpoint("east", "127.0.0.2", "payments-0"),
                endpoint("west", "127.0.0.3", "payments-w0"),
            ),
            "port": self.app_port,
            "vip": VIP,
            "trust_bundle": self.pki.bundle_map(),
        }
        defaults.update(kw)
        return snapshot(**defaults)

    def apply(self, **kw: Any) -> None:
        snap = self.snapshot(**kw)
        for sc in (self.source, self.east, self.west):
            sc.apply(snap)

    async def dial(self, dst: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect "as if" to `dst`, through the source sidecar's outbound port."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.dsts[sock.getsockname()[1]] = dst
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.source.outbound.address)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)


def settings(
    cluster_name: str, pod: str, host: str, inbound_port: int, app_host: str, multiplex: bool = True
) -> SidecarSettings:
    return SidecarSettings(
        cluster=cluster_name,
        pod=pod,
        namespace="shop",
        outbound_host=host,
        outbound_port=0,
        inbound_host=host,
        inbound_port=inbound_port,
        dns_host=host,
        dns_port=0,
        app_host=app_host,
        setup_timeout=5.0,
        multiplex=multiplex,
    )


async def start_rig(
    pki: Pki,
    *,
    multiplex: bool = True,
    dest_multiplex: bool = True,
    source_settings: dict[str, Any] | None = None,
) -> Rig:
    """The rig; `multiplex`: whether the source sidecar pools multiplexed connections;
    `dest_multiplex`: whether the destination sidecars accept them; `source_settings`: more
    `SidecarSettings` fields for the source."""
    inbound_port = same_port("127.0.0.2", "127.0.0.3", "127.0.0.4")
    app_port = same_port("127.0.0.12", "127.0.0.13")
    apps = {"east": App("payments-0"), "west": App("payments-w0")}
    await apps["east"].start("127.0.0.12", app_port)
    await apps["west"].start("127.0.0.13", app_port)
    gateway = FakeGateway(targets={"west": ("127.0.0.3", inbound_port)})
    egress = await gateway.start()
    east_anchor = TrustBundle.from_pem({EAST: [pki.east.root_pem]})
    west_anchor = TrustBundle.from_pem({WEST: [pki.west.root_pem]})
    dsts: dict[int, tuple[str, int]] = {}
    source = Sidecar(
        dataclasses.replace(
            settings("east", "client-0", "127.0.0.4", inbound_port, "127.0.0.14", multiplex),
            **(source_settings or {}),
        ),
        east_anchor,
        original_dst_of=lambda sock: dsts[sock.getpeername()[1]],
    )
    east = Sidecar(
        settings("east", "payments-0", "127.0.0.2", inbound_port, "127.0.0.12", dest_multiplex),
        east_anchor,
    )
    west = Sidecar(
        settings("west", "payments-w0", "127.0.0.3", inbound_port, "127.0.0.13", dest_multiplex),
        west_anchor,
    )
    rig = Rig(pki, source, east, west, gateway, apps, app_port, inbound_port, egress, dsts)
    source.set_identity(pki.svid(pki.east, spiffe(EAST, "client")))
    east.set_identity(pki.svid(pki.east, spiffe(EAST, "payments")))
    west.set_identity(pki.svid(pki.west, spiffe(WEST, "payments")))
    rig.apply(weights=(("local", 100),))
    for sc in (source, east, west):
        await sc.start()
    return rig


async def stop_rig(rig: Rig) -> None:
    for sc in (rig.source, rig.east, rig.west):
        await sc.aclose()
    await rig.gateway.aclose()
    for app in rig.apps.values():
        await app.aclose()
