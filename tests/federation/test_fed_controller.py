"""The controller end to end: real etcd, two agents' publishers, the config stream."""

from __future__ import annotations

import asyncio

import pytest
from etcd3aio import Etcd3Client

from federation.api.client import ConfigClient
from federation.api.session import NodeInfo
from federation.collapse import CollapseSettings
from federation.controller import ControllerSettings
from federation.controller_etcd import etcd_controller
from federation.liveness import DampingSettings
from federation.owned import ControllerStore
from federation.server import ConfigDiscoveryServicer, SnapshotPublisher, serve
from federation.store import EtcdCatalogPublisher
from mesh.model import ClusterWeight, Snapshot, TrafficPolicy
from mesh.naming import ServiceKey
from tests.federation.fed_factories import export, info
from tests.helpers import until

pytestmark = [pytest.mark.etcd, pytest.mark.usefixtures("no_leaked_tasks")]

ECHO = ServiceKey("demo", "echo")
POLICY = TrafficPolicy(ECHO, (ClusterWeight("local", 80), ClusterWeight("remote", 20)))
# One replica that always leads. The agents' leases live 2 s here: a cluster whose lease is
# gone stays Detached 1 s, its roots are not kept after (no trust grace), and the collapse
# guard's session is as old as the lease TTL.
SINGLE = ControllerSettings(
    debounce=0.05,
    elect=False,
    damping=DampingSettings(detach_grace=1),
    collapse=CollapseSettings(min_session=2),
    trust_grace=0,
)


def endpoint_clusters(snapshot: Snapshot | None) -> set[str]:
    if snapshot is None or snapshot.service(ECHO) is None:
        return set()
    service = snapshot.service(ECHO)
    assert service is not None
    return {e.cluster for e in service.endpoints}


async def test_controller_merges_publishes_and_drops_a_dead_cluster(etcd: Etcd3Client) -> None:
    east = EtcdCatalogPublisher(etcd, "east", ttl=2)
    west = EtcdCatalogPublisher(etcd, "west", ttl=2)
    publisher = SnapshotPublisher()
    controller = etcd_controller(etcd, publisher, settings=SINGLE, seed_policies=(POLICY,))
    running = await serve(ConfigDiscoveryServicer(publisher), "127.0.0.1:0", None)
    task = asyncio.create_task(controller.run(), name="test:controller")
    proxy = ConfigClient(
        f"127.0.0.1:{running.port}", NodeInfo("sidecar-1", "east"), None, insecure=True
    )
    stream = proxy.snapshots()
    try:
        await east.publish(info("east"), [export("east", addresses=("10.0.0.1", "10.0.0.2"))])
        await west.publish(info("west"), [export("west", addresses=("10.1.0.1",), created=2000.0)])

        async def current() -> Snapshot | None:
            return controller.current()

        snapshot = await until(current, check=lambda s: endpoint_clusters(s) == {"east", "west"})
        assert snapshot is not None
        echo = snapshot.service(ECHO)
        assert echo is not None
        assert echo.vip == "10.255.0.1"
        assert [e.address for e in echo.endpoints] == ["10.0.0.1", "10.0.0.2", "10.1.0.1"]
        assert [c.type for c in echo.conditions] == ["Valid"]
        assert dict(snapshot.trust_bundle) == {
            "east.fedgate.local": ("ROOT-east",),
            "west.fedgate.local": ("ROOT-west",),
        }
        assert snapshot.policies == (POLICY,)
        assert await ControllerStore(etcd).policies() == (POLICY,)

        # A proxy on the config stream gets the same snapshot (possibly after an older one).
        async def next_snapshot() -> Snapshot:
            return await asyncio.wait_for(anext(stream), 5.0)

        await until(next_snapshot, check=lambda s: s.version == snapshot.version)

        # West's agent dies: its lease expires, and after the Detached grace the next snapshot
        # has east only.
        await west.abandon()
        after = await until(current, 6.0, check=lambda s: endpoint_clusters(s) == {"east"})
        assert after is not None
        assert [c.name for c in after.clusters] == ["east"]
        assert list(after.trust_bundle) == ["east.fedgate.local"]
        echo_after = after.service(ECHO)
        assert echo_after is not None
        assert echo_after.vip == "10.255.0.1"
        assert publisher.current == after
        await until(next_snapshot, check=lambda s: s.version == after.version)
    finally:
        await stream.aclose()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await running.stop(None)
        await east.aclose()
        await west.aclose()


async def test_restarted_controller_keeps_vips_and_version(etcd: Etcd3Client) -> None:
    east = EtcdCatalogPublisher(etcd, "east", ttl=5)
    try:
        await east.publish(info("east"), [export("east", "db"), export("east", "echo")])
        first = await etcd_controller(etcd, SnapshotPublisher(), settings=SINGLE).sync()
        second = await etcd_controller(etcd, SnapshotPublisher(), settings=SINGLE).sync()
        assert first == second
        assert [(s.key.name, s.vip) for s in first.services] == [
            ("db", "10.255.0.1"),
            ("echo", "10.255.0.2"),
        ]
    finally:
        await east.aclose()
