"""Two agent replicas of one cluster against the fake API server and a real etcd: only the
elected leader publishes the cluster's keys, and when it stops (cleanly, or by crashing) the
other takes over without the cluster's keys ever disappearing from etcd."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusters.agent import Agent
from clusters.kube.lease import LeaseElection
from clusters.kube.source import KubeClusterSource
from clusters.leadership import GatedPublisher, LeaderTasks
from federation import keys
from federation.store import EtcdCatalogPublisher
from fedgate.agent_election import LeaderElectionOptions, elect
from mesh.model import ClusterInfo
from tests import helpers
from tests.clusters.kube_objects import endpoint, endpoint_slice, pod, service, service_export
from tests.clusters.kube_rig import FAST, TD, until, write_kubeconfig
from tests.kubefake import FakeKubeAPI
from tests.kubefake.resources import ENDPOINTSLICES, PODS, SERVICEEXPORTS, SERVICES

ETCD_TTL = 3  # the etcd lease outlives a crashed leader's takeover (1.5 s here)


@dataclass
class Replica:
    name: str
    gated: GatedPublisher
    tasks: LeaderTasks
    election: LeaseElection
    running: list[asyncio.Task[None]]
    source: KubeClusterSource

    async def stop(self) -> None:
        for t in self.running:
            t.cancel()
        for t in self.running:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.tasks.aclose()
        await self.gated.aclose()
        self.source.close()


@contextlib.asynccontextmanager
async def replicas(
    config: Path, client: Any, *names: str, release: bool = True
) -> AsyncIterator[dict[str, Replica]]:
    started: dict[str, Replica] = {}
    try:
        for name in names:
            source = KubeClusterSource.from_kubeconfig(
                config, "east", TD, settings=FAST, debounce=0.05
            )
            gated = GatedPublisher(lambda: EtcdCatalogPublisher(client, "east", ttl=ETCD_TTL))
            tasks = LeaderTasks()
            options = LeaderElectionOptions(
                lease_duration=1.5, renew_deadline=1.0, retry_period=0.1, identity=name
            )
            election = elect(options, source.api_client, gated, tasks, release_on_cancel=release)
            agent = Agent(ClusterInfo("east", TD, None, ()), source, gated, retry_interval=0.1)
            running = [
                asyncio.create_task(agent.run(), name=f"agent-{name}"),
                asyncio.create_task(election.run(), name=f"election-{name}"),
            ]
            started[name] = Replica(name, gated, tasks, election, running, source)
        yield started
    finally:
        for r in started.values():
            await r.stop()


def seed(api: FakeKubeAPI) -> None:
    s = api.store
    s.create(SERVICES, service("pay", ("http", 8080, "http")))
    s.create(SERVICEEXPORTS, service_export("pay"))
    s.create(PODS, pod("p1", "payments"))
    s.create(ENDPOINTSLICES, endpoint_slice("pay-a", "pay", endpoint("10.0.0.1", "p1")))


async def lease_gone(client: Any, lease: int) -> bool:
    answer = await client.lease.time_to_live(lease)
    return int(answer.TTL) == -1  # etcd: -1 for a lease that expired or never existed


async def info_lease(client: Any) -> int | None:
    """The etcd lease the cluster's info key is attached to; None when the key is absent."""
    found = await client.kv.get(keys.info_key("east"))
    return int(found.kvs[0].lease) if found.kvs else None


class Watcher:
    """Polls the cluster's info key and records every moment it was missing."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.missing = 0
        self.rounds = 0
        self.leases: list[int] = []
        self.task = asyncio.create_task(self._poll(), name="watch-info-key")

    async def _poll(self) -> None:
        while True:
            lease = await info_lease(self.client)
            if lease is None:
                self.missing += 1
            elif not self.leases or self.leases[-1] != lease:
                self.leases.append(lease)
            self.rounds += 1
            await asyncio.sleep(0.02)  # (a poll interval, not a wait for something)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def leader(rs: dict[str, Replica]) -> list[Replica]:
    return [r for r in rs.values() if r.election.leading]


async def hand_over(tmp_path: Path, etcd: Any, *, release: bool) -> None:
    with FakeKubeAPI() as api:
        seed(api)
        config = write_kubeconfig(tmp_path / "kubeconfig", api.url)
        async with replicas(config, etcd, "agent-a", "agent-b", release=release) as rs:
            await until(lambda: len(leader(rs)) == 1, "one leader")
            await until(lambda: leader(rs)[0].gated.writes > 0, "the leader's publish")
            first = leader(rs)[0]
            other = next(r for r in rs.values() if r is not first)
            assert other.gated.writes == 0  # the follower read the cluster, wrote nothing
            assert not other.gated.leading
            assert await info_lease(etcd) is not None
            watcher = Watcher(etcd)
            try:
                await until(lambda: len(watcher.leases) == 1, "the watcher's first read")
                await first.stop()
                await until(lambda: other.gated.writes > 0, "the takeover's publish")
                await until(lambda: len(watcher.leases) == 2, "the keys under the new lease")
                # The old etcd lease expires after its TTL: any key still on it would go.
                old = watcher.leases[0]

                async def expired() -> bool:
                    return await lease_gone(etcd, old)

                gone: bool = await helpers.until(expired, ETCD_TTL + 5, what="old lease expiry")
                assert gone
                rounds = watcher.rounds
                await until(lambda: watcher.rounds > rounds, "a poll after the expiry")
                assert watcher.missing == 0, "the cluster's keys vanished during the hand-over"
                assert other.election.leading
            finally:
                await watcher.stop()


async def test_only_the_leader_publishes_and_a_clean_stop_hands_over(
    tmp_path: Path, etcd: Any
) -> None:
    await hand_over(tmp_path, etcd, release=True)


async def test_a_crashed_leader_is_replaced_without_the_keys_vanishing(
    tmp_path: Path, etcd: Any
) -> None:
    await hand_over(tmp_path, etcd, release=False)
