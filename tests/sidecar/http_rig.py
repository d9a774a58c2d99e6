"""A loopback rig for HTTP: a source sidecar, destination sidecars with echo apps, a fake gateway.

Every pod has its own 127.0.0.0/8 address (sidecar inbound) and app address; the apps are the
rig's real echo workload (`clusters.rig.echo`, http.server in a thread) and the client is the
standard library's http.client, so neither end shares code with the proxy under test.
SO_ORIGINAL_DST is replaced by a table keyed by the client's source port.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any

from ca.bundle import TrustBundle
from clusters.rig.echo import EchoControl, make_server
from mesh.model import (
    AuthorizationPolicy,
    ClusterInfo,
    Endpoint,
    GatewayAddress,
    MergedService,
    ServicePort,
    Snapshot,
    TrafficPolicy,
)
from mesh.naming import ServiceKey
from sidecar.sidecar import Sidecar
from tests.sidecar.conftest import EAST, WEST, Pki, spiffe
from tests.sidecar.loopback import FakeGateway, same_port, settings

VIP = "127.77.0.20"
SVC = ServiceKey("shop", "api")
HOST = "api.shop.svc.clusterset.local"


@dataclass
class Pod:
    cluster: str
    name: str
    ip: str  # the sidecar's inbound address (the endpoint address)
    app_ip: str
    labels: dict[str, str]
    control: EchoControl
    sidecar: Sidecar
    server: ThreadingHTTPServer | None = None
    thread: threading.Thread | None = None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(
            self.cluster,
            self.ip,
            self.name,
            spiffe(f"{self.cluster}.fedgate.local", "api"),
            tuple(sorted(self.labels.items())),
        )

    def start_app(self, port: int) -> None:
        self.server = make_server(self.cluster, self.name, self.app_ip, port, self.control)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def stop_app(self) -> None:
        """Like a killed process: established connections are dropped, new ones refused."""
        self.control.hang_up = True
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data

    @property
    def pod(self) -> str:
        return str(self.json["pod"]) if self.status < 300 or self.body.startswith(b"{") else ""


@dataclass
class HttpRig:
    pki: Pki
    source: Sidecar
    pods: list[Pod]
    gateway: FakeGateway
    app_port: int
    egress: tuple[str, int]
    regions: dict[str, str] = field(default_factory=dict)
    dsts: dict[int, tuple[str, int]] = field(default_factory=dict)
    protocol: str = "HTTP"

    def pod(self, name: str) -> Pod:
        return next(p for p in self.pods if p.name == name)

    def snapshot(
        self,
        policy: TrafficPolicy | None = None,
        endpoints: Sequence[Endpoint] | None = None,
        version: str = "v1",
        authorization: Sequence[AuthorizationPolicy] = (),
    ) -> Snapshot:
        eps = tuple(endpoints if endpoints is not None else (p.endpoint for p in self.pods))
        svc = MergedService(
            key=SVC,
            vip=VIP,
            ports=(ServicePort("http", self.app_port, self.protocol),),
            clusters=tuple(sorted({e.cluster for e in eps})),
            endpoints=eps,
        )

        def info(name: str, egress: tuple[str, int]) -> ClusterInfo:
            gw = GatewayAddress("127.0.0.1", 15444, egress[0], egress[1], "tls")
            return ClusterInfo(
                name, f"{name}.fedgate.local", gw, (), region=self.regions.get(name, "")
            )

        return Snapshot(
            version=version,
            clusters=(info("east", self.egress), info("west", ("127.0.0.1", 1))),
            services=(svc,),
            policies=(policy,) if policy is not None else (),
            trust_bundle=self.pki.bundle_map(),
            authorization=tuple(authorization),
        )

    def apply(self, policy: TrafficPolicy | None = None, **kw: Any) -> None:
        snap = self.snapshot(policy, **kw)
        for sc in (self.source, *(p.sidecar for p in self.pods)):
            sc.apply(snap)

    def connection(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        """An HTTP/1.1 client connection "to" VIP:port, through the source sidecar."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.dsts[sock.getsockname()[1]] = (VIP, self.app_port)
        sock.settimeout(timeout)
        try:
            sock.connect(self.source.outbound.address)
        except OSError:
            sock.close()  # a refused connection must not leak its socket into the next test
            raise
        conn = http.client.HTTPConnection(HOST, self.app_port, timeout=timeout)
        conn.sock = sock
        return conn

    def call(
        self,
        path: str = "/",
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: Any = None,
        conn: http.client.HTTPConnection | None = None,
        encode_chunked: bool = False,
    ) -> Reply:
        """One request (blocking: run it in a thread)."""
        own = conn is None
        c = conn or self.connection()
        try:
            started = time.monotonic()
            c.request(method, path, body=body, headers=headers or {}, encode_chunked=encode_chunked)
            r = c.getresponse()
            data = r.read()
            return Reply(
                r.status,
                {k.lower(): v for k, v in r.getheaders()},
                data,
                time.monotonic() - started,
            )
        finally:
            if own:
                c.close()

    async def acall(self, path: str = "/", **kw: Any) -> Reply:
        return await asyncio.to_thread(self.call, path, **kw)

    async def many(self, n: int, path: str = "/", **kw: Any) -> list[Reply]:
        """`n` sequential requests on one keep-alive connection."""

        def run() -> list[Reply]:
            conn = self.connection()
            try:
                return [self.call(path, conn=conn, **kw) for _ in range(n)]
            finally:
                conn.close()

        return await asyncio.to_thread(run)


async def start_http_rig(
    pki: Pki,
    layout: Sequence[tuple[str, str, dict[str, str]]],
    seed: int = 1,
    protocol: str = "HTTP",
) -> HttpRig:
    """Pods as (cluster, name, labels); east pods get 127.0.0.(2+i), west 127.0.0.(40+i)."""
    ips = []
    east = west = 0
    for cluster, _, _ in layout:
        if cluster == "east":
            ips.append((f"127.0.0.{2 + east * 2}", f"127.0.1.{2 + east * 2}"))
            east += 1
        else:
            ips.append((f"127.0.0.{40 + west}", f"127.0.1.{40 + west}"))
            west += 1
    inbound_port = same_port(*(ip for ip, _ in ips), "127.0.0.99")
    app_port = same_port(*(app for _, app in ips))
    anchors = {
        "east": TrustBundle.from_pem({EAST: [pki.east.root_pem]}),
        "west": TrustBundle.from_pem({WEST: [pki.west.root_pem]}),
    }
    cas = {"east": pki.east, "west": pki.west}
    west_pods = [ip for (c, _, _), (ip, _) in zip(layout, ips, strict=True) if c == "west"]
    gateway = FakeGateway(
        targets={"west": (west_pods[0], inbound_port)} if west_pods else {},
    )
    egress = await gateway.start()
    dsts: dict[int, tuple[str, int]] = {}
    source = Sidecar(
        settings("east", "client-0", "127.0.0.99", inbound_port, "127.0.0.98"),
        anchors["east"],
        rng=random.Random(seed),
        original_dst_of=lambda sock: dsts[sock.getpeername()[1]],
    )
    source.set_identity(pki.svid(pki.east, spiffe(EAST, "client")))
    pods = []
    for (cluster, name, labels), (ip, app_ip) in zip(layout, ips, strict=True):
        sc = Sidecar(settings(cluster, name, ip, inbound_port, app_ip), anchors[cluster])
        td = f"{cluster}.fedgate.local"
        sc.set_identity(pki.svid(cas[cluster], spiffe(td, "api")))
        pods.append(Pod(cluster, name, ip, app_ip, labels, EchoControl(rng=random.Random(7)), sc))
    rig = HttpRig(pki, source, pods, gateway, app_port, egress, dsts=dsts, protocol=protocol)
    rig.apply()
    for pod in pods:
        pod.start_app(app_port)
        await pod.sidecar.start()
    await source.start()
    return rig


async def stop_http_rig(rig: HttpRig) -> None:
    await rig.source.aclose()
    for pod in rig.pods:
        await pod.sidecar.aclose()
        await asyncio.to_thread(pod.stop_app)
    await rig.gateway.aclose()
    await asyncio.sleep(0.3)
