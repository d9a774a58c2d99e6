"""Leader election against the fake API server with the unmodified `kubernetes` client: one of
two electors leads, a crashed leader is replaced after the lease duration, a released Lease is
taken at once, and a write on a stale resourceVersion (409) leaves the loser following."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from clusters.kube.election import ElectionSettings
from clusters.kube.lease import LeaseElection
from tests.clusters.kube_rig import api_client, until
from tests.kubefake import FakeKubeAPI
from tests.kubefake.resources import LEASES
from tests.kubefake.store import StoreError

NS, NAME = "fedgate-system", "fedgate-agent"
# Short durations so takeovers happen within a test; the rules are the production ones.
FAST = ElectionSettings(lease_duration=1.5, renew_deadline=1.0, retry_period=0.1)


class Candidate:
    def __init__(self, client: Any, identity: str, **kw: Any) -> None:
        self.changes: list[bool] = []
        self.election = LeaseElection(client, NS, NAME, identity, self._changed, FAST, **kw)
        self.task = asyncio.create_task(self.election.run(), name=f"election-{identity}")

    async def _changed(self, leading: bool) -> None:
        self.changes.append(leading)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@contextlib.asynccontextmanager
async def candidates(
    client: Any, *specs: tuple[str, dict[str, Any]]
) -> AsyncIterator[list[Candidate]]:
    started = [Candidate(client, identity, **kw) for identity, kw in specs]
    try:
        yield started
    finally:
        for c in started:
            await c.stop()


def holder(api: FakeKubeAPI) -> str:
    return str(api.store.get(LEASES, NS, NAME)["spec"].get("holderIdentity") or "")


def leaders(cs: list[Candidate]) -> list[str]:
    return [c.election.identity for c in cs if c.election.leading]


async def test_one_of_two_leads_and_a_crashed_leader_is_replaced(tmp_path: Path) -> None:
    with FakeKubeAPI() as api, api_client(tmp_path, api.url) as client:
        async with candidates(
            client, ("a", {"release_on_cancel": False}), ("b", {"release_on_cancel": False})
        ) as cs:
            await until(lambda: len(leaders(cs)) == 1, "one leader")
            first = next(c for c in cs if c.election.leading)
            other = next(c for c in cs if c is not first)
            assert holder(api) == first.election.identity
            lease = api.store.get(LEASES, NS, NAME)
            assert lease["spec"]["leaseDurationSeconds"] == 2  # 1.5 s, rounded
            # Renewals keep it: several retry periods later, still one leader, the same one.
            rv = lease["metadata"]["resourceVersion"]
            await until(
                lambda: api.store.get(LEASES, NS, NAME)["metadata"]["resourceVersion"] != rv,
                "a renewal",
            )
            assert leaders(cs) == [first.election.identity]
            assert other.changes == []
            # The leader crashes (stops renewing, no release): the other takes over only once
            # the record has stood still for the lease duration.
            await first.stop()
            stopped = time.monotonic()
            await until(lambda: other.election.leading, "the takeover")
            assert time.monotonic() - stopped >= 1.5 - FAST.retry_period
            assert holder(api) == other.election.identity
            assert api.store.get(LEASES, NS, NAME)["spec"]["leaseTransitions"] == 1
            assert first.changes == [True]
            assert other.changes == [True]


async def test_a_released_lease_is_taken_at_the_next_try(tmp_path: Path) -> None:
    with FakeKubeAPI() as api, api_client(tmp_path, api.url) as client:
        async with candidates(client, ("a", {}), ("b", {})) as cs:
            await until(lambda: len(leaders(cs)) == 1, "one leader")
            first = next(c for c in cs if c.election.leading)
            other = next(c for c in cs if c is not first)
            await first.stop()  # releases: empty holder, duration 1 s
            assert first.changes == [True, False]
            stopped = time.monotonic()
            await until(lambda: other.election.leading, "the takeover")
            # Well before the 1.5 s a crashed leader would cost (retry period, jittered).
            assert time.monotonic() - stopped < 1.0
            assert holder(api) == other.election.identity


async def test_a_write_on_a_stale_resource_version_is_a_conflict_and_loses(
    tmp_path: Path,
) -> None:
    with FakeKubeAPI() as api, api_client(tmp_path, api.url) as client:
        intruded: list[str] = []

        def wall_clock() -> float:
            # Called between the elector's read and its write: another replica claims the
            # Lease right then, so the write carries a stale resourceVersion.
            if not intruded:
                intruded.append(intrude(api))
            return time.time()

        async with candidates(client, ("a", {"wall_clock": wall_clock})) as cs:
            await until(lambda: bool(intruded), "the intrusion")
            lease = api.store.get(LEASES, NS, NAME)
            assert lease["metadata"]["resourceVersion"] == intruded[0]  # a's write got 409
            assert holder(api) == "intruder"
            # a keeps following while the intruder's claim is fresh (1.5 s).
            assert not cs[0].election.leading
            assert cs[0].changes == []
            # The intruder never renews: a takes over after the lease duration.
            await until(lambda: cs[0].election.leading, "the takeover")
            assert holder(api) == "a"


def intrude(api: FakeKubeAPI) -> str:
    """Another replica's claim, written straight into the store; its resourceVersion."""
    claim = {
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {"holderIdentity": "intruder", "leaseDurationSeconds": 2, "leaseTransitions": 0},
    }
    try:
        api.store.get(LEASES, NS, NAME)
        written = api.store.update(LEASES, claim)
    except StoreError:  # not created yet: a's Create then meets AlreadyExists (409 too)
        written = api.store.create(LEASES, claim, NS)
    return str(written["metadata"]["resourceVersion"])


def test_the_fake_answers_a_stale_lease_replace_with_409(tmp_path: Path) -> None:
    with FakeKubeAPI() as api, api_client(tmp_path, api.url) as client:
        coord: Any = kubernetes.client.CoordinationV1Api(client)  # (stubs lack dict bodies)
        body = {"metadata": {"name": NAME}, "spec": {"holderIdentity": "a"}}
        created = coord.create_namespaced_lease(NS, body)
        stale = created.metadata.resource_version
        created.spec.holder_identity = "b"
        coord.replace_namespaced_lease(NAME, NS, created)
        created.metadata.resource_version = stale
        created.spec.holder_identity = "c"
        with pytest.raises(kubernetes.client.ApiException) as e:
            coord.replace_namespaced_lease(NAME, NS, created)
        assert e.value.status == 409
        assert coord.read_namespaced_lease(NAME, NS).spec.holder_identity == "b"
