"""Against a real 3-member etcd: losing any one member loses no event, lease or leadership."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
from etcd3aio import Etcd3Client

from federation.catalog import Changed, Loaded
from federation.controller import ControllerSettings
from federation.controller_etcd import etcd_controller
from federation.errors import StoreError
from federation.etcd import open_client
from federation.server import SnapshotPublisher
from federation.store import EtcdCatalogPublisher, EtcdWatcher
from mesh.model import Snapshot
from mesh.naming import ServiceKey
from tests.etcd_fixture import reset_etcd
from tests.federation.etcd_cluster import EtcdCluster
from tests.federation.fed_factories import export, info
from tests.helpers import until

pytestmark = [pytest.mark.etcd, pytest.mark.usefixtures("no_leaked_tasks")]

ECHO = ServiceKey("demo", "echo")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    c = EtcdCluster(tmp_path_factory.mktemp("etcd3"))
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
async def etcd3(cluster: EtcdCluster) -> AsyncIterator[Etcd3Client]:
    for i in range(cluster.size):  # every member up again (a test killed one)
        if cluster._processes[i] is None:
            cluster.restart(i)
    client = await open_client(cluster.endpoints)
    # Right after a member restart the cluster may still be electing: retry for 5 s.
    await until(
        lambda: reset_etcd(client),
        5.0,
        check=lambda _: True,
        what="etcd reset",
        interval=0.1,
        ignoring=(Exception,),
    )
    try:
        yield client
    finally:
        await client.close()


def victim(cluster: EtcdCluster, which: str) -> int:
    leader = cluster.leader_index()
    return leader if which == "leader" else (leader + 1) % cluster.size


async def test_watch_delivers_every_revision_once_across_member_losses(
    cluster: EtcdCluster, etcd3: Etcd3Client
) -> None:
    # Each member is killed in turn (and restarted), so whichever member serves the watch is
    # killed at least once: the watch must resume on another from the revision after its last.
    watcher_client = await open_client(cluster.endpoints)
    watcher = EtcdWatcher(watcher_client, "/t/")
    batches = watcher.batches()
    seen: list[int] = []
    try:
        first = await asyncio.wait_for(anext(batches), 5.0)
        assert isinstance(first, Loaded)

        async def consume() -> None:
            async for batch in batches:
                assert isinstance(batch, Changed)
                seen.extend(e.revision for e in batch.events)

        consumer = asyncio.create_task(consume(), name="test:consume")
        assert etcd3.kv is not None
        for i in range(130):
            if i % 40 == 10:
                cluster.kill(i // 40)
            if i % 40 == 30:
                await asyncio.to_thread(cluster.restart, i // 40)
            while True:
                try:
                    await etcd3.kv.put(f"/t/k{i:04d}", b"x", timeout=2.0)
                    break
                except Exception:  # a put during a raft election: try again
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.005)
        truth = await etcd3.kv.get("/t/", b"/t0")
        wanted = sorted(int(kv.mod_revision) for kv in truth.kvs)
        await until(lambda: len(seen) >= len(wanted), within=10.0)
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        assert seen == wanted  # in order, none lost, none twice
        assert watcher.resumes >= 1
        assert watcher.reloads == 0
    finally:
        await batches.aclose()
        await watcher_client.close()


@pytest.mark.parametrize("which", ["leader", "follower"])
async def test_controller_agent_and_election_survive_a_member_loss(
    cluster: EtcdCluster, etcd3: Etcd3Client, which: str
) -> None:
    ctl_client = await open_client(cluster.endpoints)
    agent_client = await open_client(cluster.endpoints)
    publisher = SnapshotPublisher()
    settings = ControllerSettings(replica="c0", debounce=0.02, leader_ttl=2)
    controller = etcd_controller(ctl_client, publisher, settings=settings)
    task = asyncio.create_task(controller.run(), name="test:controller")
    agent = EtcdCatalogPublisher(agent_client, "east", ttl=2)

    def addresses(snapshot: Snapshot | None) -> list[str]:
        svc = snapshot.service(ECHO) if snapshot else None
        return [e.address for e in svc.endpoints] if svc else []

    try:
        await agent.publish(info("east"), [export("east", addresses=("10.0.0.1",))])
        await until(lambda: controller.is_leader and addresses(controller.current()) != [])
        last: tuple[str, ...] = ()
        for n in range(2, 40):
            if n == 10:
                cluster.kill(victim(cluster, which))
            last = tuple(f"10.0.{n}.{i}" for i in range(1, 3))
            while True:
                try:
                    await agent.publish(info("east"), [export("east", addresses=last)])
                    break
                except StoreError:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.02)
        await until(lambda: addresses(controller.current()) == list(last), within=10.0)
        await until(lambda: controller.is_leader, within=5.0)
        # Writes still work: a new service gets a VIP from the (possibly re-elected) leader.
        await agent.publish(info("east"), [export("east", addresses=last), export("east", "db")])

        def db_vip() -> str:
            s = controller.current()
            db = s.service(ServiceKey("demo", "db")) if s else None
            return db.vip if db else ""

        await until(lambda: db_vip() == "10.255.0.2", within=10.0)
        assert agent.leases_lost == 0  # the agent's lease never lapsed
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await agent.aclose()
        await agent_client.close()
        await ctl_client.close()
