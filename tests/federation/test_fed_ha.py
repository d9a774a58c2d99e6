"""Two controller replicas on a real etcd: one leader writes, both serve, proxies fail over."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import pytest
from etcd3aio import Etcd3Client

from federation import keys
from federation.api.client import ConfigClient
from federation.collapse import CollapseSettings
from federation.controller import Controller, ControllerSettings
from federation.controller_etcd import etcd_controller
from federation.etcd import open_client
from federation.liveness import DampingSettings
from federation.server import ConfigDiscoveryServicer, ConfigServer, SnapshotPublisher, serve
from federation.status import LeaderRecord
from federation.store import EtcdCatalogPublisher
from fedgate.cli_status import collect, render
from mesh.model import ServicePort, Snapshot
from mesh.naming import ServiceKey
from tests.etcd_fixture import EtcdServer
from tests.federation.fed_factories import export, info
from tests.helpers import until

pytestmark = [pytest.mark.etcd, pytest.mark.usefixtures("no_leaked_tasks")]

ECHO = ServiceKey("demo", "echo")
TTL = 2
FAST_DAMPING = DampingSettings(detach_grace=0, half_life=1.0, max_hold=3.0)


class Replica:
    """One controller process: its own etcd client, controller loop and gRPC server."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.client: Etcd3Client | None = None
        self.server: ConfigServer | None = None
        self.task: asyncio.Task[None] | None = None
        self.publisher = SnapshotPublisher()
        self.controller: Controller | None = None

    async def start(self, endpoints: list[str], port: int = 0) -> None:
        self.client = await open_client(endpoints)
        # Clusters come and go within seconds of a replica's start here: the collapse guard's
        # young-session rule (tests/federation/test_fed_collapse.py) would hold those drops.
        settings = ControllerSettings(
            replica=self.name,
            debounce=0.02,
            leader_ttl=TTL,
            damping=FAST_DAMPING,
            collapse=CollapseSettings(min_session=0),
        )
        self.controller = etcd_controller(self.client, self.publisher, settings=settings)
        servicer = ConfigDiscoveryServicer(self.publisher, replica=self.name)
        self.server = await serve(servicer, f"127.0.0.1:{port}", None)
        self.task = asyncio.create_task(self.controller.run(), name=f"test:ctl:{self.name}")

    @property
    def ctl(self) -> Controller:
        assert self.controller is not None
        return self.controller

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"

    async def stop(self, crash: bool = False) -> None:
        if crash and self.client is not None:
            await self.client.close()  # no resignation reaches etcd: the lease must expire
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        if self.server is not None:
            await self.server.stop(None)
            self.server = None
        if self.client is not None and not crash:
            await self.client.close()
        self.client = None


@pytest.fixture
async def pair(etcd: Etcd3Client, etcd_server: EtcdServer) -> AsyncIterator[list[Replica]]:
    replicas = [Replica("c0"), Replica("c1")]
    for r in replicas:
        await r.start([etcd_server.endpoint])
    try:
        yield replicas
    finally:
        for r in replicas:
            await r.stop()


def leader_of(pair: list[Replica]) -> Replica:
    leading = [r for r in pair if r.ctl.is_leader]
    assert len(leading) == 1, [r.name for r in leading]
    return leading[0]


async def until_leader(pair: list[Replica], within: float = 5.0) -> Replica:
    await until(lambda: sum(r.ctl.is_leader for r in pair) == 1, within)
    return leader_of(pair)


async def read_json(etcd: Etcd3Client, key: str) -> dict[str, object] | None:
    assert etcd.kv is not None
    found = await etcd.kv.get(key)
    return json.loads(found.kvs[0].value) if found.kvs else None


def versions(pair: list[Replica]) -> set[str]:
    return {s.version if (s := r.ctl.current()) else "" for r in pair}


async def test_replicas_agree_and_only_the_leader_writes_status(
    etcd: Etcd3Client, pair: list[Replica]
) -> None:
    east = EtcdCatalogPublisher(etcd, "east", ttl=5)
    west = EtcdCatalogPublisher(etcd, "west", ttl=5)
    try:
        await east.publish(info("east"), [export("east", created=1.0)])
        # MCS conflict: west names port 8080 "web" where east (older) names it "http".
        conflicting = export("west", created=2.0, ports=(ServicePort("web", 8080, "HTTP"),))
        await west.publish(info("west"), [conflicting])
        leader = await until_leader(pair)

        def converged() -> bool:
            snaps = [r.ctl.current() for r in pair]
            return all(
                s is not None and (svc := s.service(ECHO)) is not None and svc.vip != ""
                and len(svc.endpoints) == 2
                for s in snaps
            ) and len(versions(pair)) == 1  # fmt: skip

        await until(converged)
        status = await until(
            lambda: read_json(etcd, keys.service_status_key(ECHO)),
            check=lambda s: s is not None and s["vip"] == "10.255.0.1",
        )
        assert status is not None
        assert status["endpoints"] == {"east": 1, "west": 1}
        conditions = status["conditions"]
        assert isinstance(conditions, list)
        assert [c["type"] for c in conditions] == ["Conflict"]
        assert "the oldest export wins" in conditions[0]["message"]
        exports = status["exports"]
        assert isinstance(exports, dict)
        assert sorted(exports) == ["east", "west"]  # MCS: every export carries the condition
        config = await until(
            lambda: read_json(etcd, keys.CONFIG_STATUS_KEY),
            check=lambda c: c is not None and c["version"] == next(iter(versions(pair))),
        )
        assert config is not None
        assert config["leader"] == leader.name
        assert config["clusters"] == ["east", "west"]
        follower = next(r for r in pair if r is not leader)
        assert follower.ctl.stats.status_writes == 0

        data = await collect([etcd_server_endpoint(etcd)])
        text = render(data)
        assert f"leader    {leader.name}" in text
        assert "echo.demo" in text
        assert "Conflict" in text
        assert "east=1 west=1" in text
        assert data["clusters"]["west"]["routed"] is True
    finally:
        await east.aclose()
        await west.aclose()


def etcd_server_endpoint(etcd: Etcd3Client) -> str:
    target = etcd._manager.target  # "ipv4:127.0.0.1:port"
    return target.removeprefix("ipv4:").split(",")[0]


async def test_killing_the_leader_moves_writes_and_streams_fail_over(
    etcd: Etcd3Client, pair: list[Replica]
) -> None:
    east = EtcdCatalogPublisher(etcd, "east", ttl=5)
    proxy = ConfigClient(
        [r.address for r in pair], node_id="sc", cluster="east", insecure=True, backoff_initial=0.05
    )
    stream = proxy.snapshots()
    try:
        await east.publish(info("east"), [export("east")])
        leader = await until_leader(pair)

        def settled() -> bool:  # both replicas serve the same version, with echo's VIP
            s = pair[0].ctl.current()
            svc = s.service(ECHO) if s else None
            return len(versions(pair)) == 1 and svc is not None and svc.vip != ""

        await until(settled)
        final = next(iter(versions(pair)))
        while proxy.latest is None or proxy.latest.version != final:
            await asyncio.wait_for(anext(stream), 5.0)
        first: Snapshot = proxy.latest
        connected_to = proxy.replica
        waiting = asyncio.ensure_future(anext(stream))

        # Kill the replica the proxy streams from: it fails over, and nothing is resent.
        victim = next(r for r in pair if r.name == connected_to)
        survivor = next(r for r in pair if r is not victim)
        await victim.stop(crash=True)
        killed = time.monotonic()
        await until(lambda: proxy.failovers >= 1 and survivor.publisher.subscribers == 1)
        assert not waiting.done()
        assert proxy.latest == first  # routing on the last good snapshot meanwhile

        # Writes move to the survivor within the lease TTL (if the victim led).
        await until(lambda: survivor.ctl.is_leader, within=TTL + 3)
        if victim is leader:
            assert time.monotonic() - killed < TTL + 2
        await east.publish(info("east"), [export("east"), export("east", "db")])
        newer = await asyncio.wait_for(waiting, 5.0)
        db = newer.service(ServiceKey("demo", "db"))
        assert db is not None
        assert db.vip == "10.255.0.2"
        assert proxy.replica == survivor.name
    finally:
        await stream.aclose()
        await east.aclose()


async def test_flapping_cluster_is_held_out_by_every_replica(
    etcd: Etcd3Client, pair: list[Replica]
) -> None:
    east = EtcdCatalogPublisher(etcd, "east", ttl=5)
    try:
        await east.publish(info("east"), [export("east")])
        await until_leader(pair)

        def routed(name: str) -> list[bool]:
            return [
                (s := r.ctl.current()) is not None and s.cluster(name) is not None for r in pair
            ]

        west = None
        for _ in range(2):  # two lease losses in quick succession
            west = EtcdCatalogPublisher(etcd, "west", ttl=5)
            await west.publish(info("west"), [export("west")])
            await until(lambda: routed("west") == [True, True])
            await west.aclose()  # revoke: keys gone at once
            await until(lambda: routed("west") == [False, False])
        west = EtcdCatalogPublisher(etcd, "west", ttl=5)
        await west.publish(info("west"), [export("west")])
        back = time.monotonic()
        record = await until(
            lambda: read_json(etcd, keys.cluster_status_key("west")),
            check=lambda r: r is not None and r["state"] == "Suppressed",
        )
        assert record is not None
        assert record["losses"] == 2
        assert routed("west") == [False, False]  # followers honour the leader's damping
        await until(lambda: routed("west") == [True, True], within=FAST_DAMPING.max_hold + 2)
        assert time.monotonic() - back > 0.3  # it was held, not re-added at once
        await west.aclose()
    finally:
        await east.aclose()


async def test_a_replica_elected_after_the_services_merged_gives_each_a_vip(
    etcd: Etcd3Client, etcd_server: EtcdServer
) -> None:
    """Issue 15: services exported before any leader was elected must get VIPs from it."""
    assert etcd.kv is not None
    assert etcd.lease is not None
    squatter = await etcd.lease.grant(60)  # another replica leads, then goes away
    await etcd.kv.put(keys.LEADER_KEY, LeaderRecord("gone").encode(), lease=squatter.ID)
    east = EtcdCatalogPublisher(etcd, "east", ttl=5)
    replica = Replica("c0")
    await replica.start([etcd_server.endpoint])
    db = ServiceKey("demo", "db")

    def vips() -> tuple[str | None, ...]:
        s = replica.ctl.current()
        return tuple(
            svc.vip if s is not None and (svc := s.service(k)) is not None else None
            for k in (ECHO, db)
        )

    try:
        await east.publish(info("east"), [export("east"), export("east", "db")])
        await until(lambda: vips() == ("", ""))  # merged by a follower: no VIP yet
        await etcd.lease.revoke(squatter.ID)
        await until(lambda: replica.ctl.is_leader)
        await until(lambda: all(vips()))
        assert sorted(v or "" for v in vips()) == ["10.255.0.1", "10.255.0.2"]
        status = await until(
            lambda: read_json(etcd, keys.service_status_key(db)),
            check=lambda s: s is not None and s["vip"] != "",
        )
        assert status is not None
    finally:
        await replica.stop()
        await east.aclose()
