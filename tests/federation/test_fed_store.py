"""The etcd adapters against a real etcd: publish/load, leases, bad keys, watch, VIPs, policies.

What agents published is read as the controller reads it (`tests.federation.catalog_read`)."""

from __future__ import annotations

import asyncio
import time

import pytest
from etcd3aio import Etcd3Client
from structlog.testing import capture_logs

from federation import keys
from federation.errors import StoreError, StoreUnavailableError
from federation.etcd import open_client, parse_endpoint
from federation.owned import ControllerStore
from federation.store import Changed, EtcdCatalogPublisher, EtcdWatcher, Loaded
from mesh.codec import dumps, export_to_json
from mesh.model import ClusterWeight, Endpoint, ServiceExport, TrafficPolicy
from mesh.naming import ServiceKey
from tests.federation.catalog_read import read_catalog, read_view
from tests.federation.fed_factories import endpoint, export, info
from tests.helpers import free_port, until

pytestmark = [pytest.mark.etcd, pytest.mark.usefixtures("no_leaked_tasks")]

ECHO = ServiceKey("demo", "echo")
DB = ServiceKey("demo", "db")


async def revision(client: Etcd3Client) -> int:
    assert client.kv is not None
    return int((await client.kv.get("/fedgate/none")).header.revision)


async def test_publish_and_load_roundtrip(etcd: Etcd3Client) -> None:
    publisher = EtcdCatalogPublisher(etcd, "east", ttl=5)
    try:
        exports = [export("east", "echo"), export("east", "db", addresses=("10.0.0.7", "10.0.0.8"))]
        await publisher.publish(info("east"), exports)
        clusters, loaded = await read_catalog(etcd)
        assert clusters == (info("east"),)
        assert loaded == (exports[1], exports[0])  # sorted by service key

        # Every key is attached to the one lease.
        assert etcd.lease is not None
        assert publisher.lease_id is not None
        ttl = await etcd.lease.time_to_live(publisher.lease_id, keys=True)
        assert sorted(k.decode() for k in ttl.keys) == sorted(
            [keys.info_key("east"), keys.export_key("east", ECHO), keys.export_key("east", DB)]
        )

        # Republishing without db deletes its key, in the same single transaction.
        before = await revision(etcd)
        await publisher.publish(info("east"), [exports[0]])
        assert await revision(etcd) == before + 1
        assert (await read_catalog(etcd))[1] == (exports[0],)
    finally:
        await publisher.aclose()
    assert await read_catalog(etcd) == ((), ())  # aclose revoked the lease: keys gone at once


async def test_publisher_refuses_other_clusters_data(etcd: Etcd3Client) -> None:
    publisher = EtcdCatalogPublisher(etcd, "east", ttl=5)
    try:
        with pytest.raises(ValueError, match="info of cluster 'west'"):
            await publisher.publish(info("west"), [])
        with pytest.raises(ValueError, match="export of 'west'"):
            await publisher.publish(info("east"), [export("west")])
        with pytest.raises(ValueError, match="exported twice"):
            await publisher.publish(info("east"), [export("east"), export("east")])
        assert await read_catalog(etcd) == ((), ())
    finally:
        await publisher.aclose()


async def test_abandoned_lease_expires_within_ttl(etcd: Etcd3Client) -> None:
    east = EtcdCatalogPublisher(etcd, "east", ttl=2)
    west = EtcdCatalogPublisher(etcd, "west", ttl=2)
    try:
        await east.publish(info("east"), [export("east")])
        await west.publish(info("west"), [export("west")])
        await east.abandon()  # as if the agent crashed: no revoke, no more keepalives
        started = time.monotonic()
        assert [c.name for c in (await read_catalog(etcd))[0]] == ["east", "west"]
        _clusters, exports = await until(
            lambda: read_catalog(etcd),
            5.0,
            check=lambda loaded: [c.name for c in loaded[0]] == ["west"],
        )
        # TTL, plus slack for etcd's 500 ms expiry sweep and a loaded machine.
        assert time.monotonic() - started < 2 + 2.0
        # West was granted its lease with east's and outlives it: its keepalive works.
        assert [x.cluster for x in exports] == ["west"]
        assert etcd.lease is not None
        assert west.lease_id is not None
        assert (await etcd.lease.time_to_live(west.lease_id)).TTL > 0
    finally:
        await east.aclose()
        await west.aclose()


async def test_lost_lease_is_regranted_and_everything_republished(etcd: Etcd3Client) -> None:
    publisher = EtcdCatalogPublisher(etcd, "east", ttl=2)
    try:
        await publisher.publish(info("east"), [export("east")])
        first = publisher.lease_id
        assert etcd.lease is not None
        assert first is not None
        await etcd.lease.revoke(first)  # etcd forgets the lease, as after a long partition
        assert await read_catalog(etcd) == ((), ())
        clusters, exports = await until(
            lambda: read_catalog(etcd), 5.0, check=lambda loaded: bool(loaded[0])
        )
        assert clusters == (info("east"),)
        assert exports == (export("east"),)
        assert publisher.lease_id not in (None, first)
        assert publisher.leases_lost == 1
    finally:
        await publisher.aclose()


async def test_malformed_keys_are_skipped(etcd: Etcd3Client) -> None:
    assert etcd.kv is not None
    publisher = EtcdCatalogPublisher(etcd, "east", ttl=5)
    west_identity = endpoint("west", "10.1.0.1").identity
    impostor = ServiceExport(
        "east", DB, (), 1.0, (Endpoint("east", "10.0.0.9", "pod-x", west_identity),)
    )
    try:
        await publisher.publish(info("east"), [export("east")])
        bad = {
            "/fedgate/clusters/bad/info": b"not json",
            "/fedgate/clusters/Bad/info": b"{}",
            "/fedgate/clusters/west/weird/key": b"{}",
            "/fedgate/clusters/west/info": b'{"name": "west"}',
            # An agent writing an export of another cluster under its own prefix.
            "/fedgate/clusters/west/exports/demo/db": dumps(export_to_json(export("east", "db"))),
        }
        for key, value in bad.items():
            await etcd.kv.put(key, value)
        # Endpoints whose identities are in another cluster's trust domain: loaded before
        # east's info (key order), so not a problem of the load, but never merged.
        await etcd.kv.put(keys.export_key("east", DB), dumps(export_to_json(impostor)))
        _, problems = await read_view(etcd)
        assert sorted(p.key for p in problems) == sorted(bad)
        assert await read_catalog(etcd) == ((info("east"),), (export("east"),))
    finally:
        await publisher.aclose()


async def test_the_watcher_yields_the_load_then_one_batch_per_transaction(
    etcd: Etcd3Client,
) -> None:
    publisher = EtcdCatalogPublisher(etcd, "east", ttl=5)
    batches = EtcdWatcher(etcd, keys.CLUSTERS_PREFIX).batches()
    try:
        loaded = await asyncio.wait_for(anext(batches), 5.0)
        assert isinstance(loaded, Loaded)
        assert loaded.events == ()
        waiting = asyncio.ensure_future(anext(batches))
        await publisher.publish(info("east"), [export("east")])
        first = await asyncio.wait_for(waiting, 5.0)
        assert isinstance(first, Changed)
        assert first.revision == await revision(etcd)  # one transaction, one batch
        assert len(first.events) == 2
        await publisher.publish(info("east"), [])
        second = await asyncio.wait_for(anext(batches), 5.0)
        assert isinstance(second, Changed)
        assert second.revision == first.revision + 1
    finally:
        await batches.aclose()
        await publisher.aclose()


async def test_the_watcher_resumes_after_its_load(etcd: Etcd3Client) -> None:
    publisher = EtcdCatalogPublisher(etcd, "east", ttl=5)
    batches = EtcdWatcher(etcd, keys.CLUSTERS_PREFIX).batches()
    try:
        await publisher.publish(info("east"), [])
        loaded = await asyncio.wait_for(anext(batches), 5.0)
        assert isinstance(loaded, Loaded)
        await publisher.publish(info("east"), [export("east")])  # before the watch starts
        seen = await asyncio.wait_for(anext(batches), 5.0)
        assert isinstance(seen, Changed)
        assert seen.revision == loaded.revision + 1
    finally:
        await batches.aclose()
        await publisher.aclose()


async def test_the_watcher_loads_again_after_a_compaction(etcd: Etcd3Client) -> None:
    assert etcd.kv is not None
    publisher = EtcdCatalogPublisher(etcd, "east", ttl=5)
    watcher = EtcdWatcher(etcd, keys.CLUSTERS_PREFIX)
    batches = watcher.batches()
    try:
        assert isinstance(await asyncio.wait_for(anext(batches), 5.0), Loaded)
        await publisher.publish(info("east"), [])
        await publisher.publish(info("east"), [export("east")])
        compacted = await revision(etcd)
        await etcd.kv.compact(compacted, physical=True)  # the history after our load is gone
        with capture_logs() as logs:
            reloaded = await asyncio.wait_for(anext(batches), 5.0)
        assert isinstance(reloaded, Loaded)
        assert reloaded.revision == compacted
        assert len(reloaded.events) == 2
        assert watcher.reloads == 1
        assert logs[0]["event"] == "watch history compacted, reloading"
        await publisher.publish(info("east"), [])
        after = await asyncio.wait_for(anext(batches), 5.0)
        assert isinstance(after, Changed)
        assert after.revision == compacted + 1
    finally:
        await batches.aclose()
        await publisher.aclose()


async def test_vip_allocation_is_stable_and_unique(etcd: Etcd3Client) -> None:
    store = ControllerStore(etcd)
    services = [ServiceKey("demo", n) for n in ("echo", "db", "web")]
    vips = await store.ensure_vips(services)
    assert vips == {
        ServiceKey("demo", "db"): "10.255.0.1",
        ServiceKey("demo", "echo"): "10.255.0.2",
        ServiceKey("demo", "web"): "10.255.0.3",
    }
    # Stable: asking again (or after a controller restart) changes nothing.
    assert await ControllerStore(etcd).ensure_vips(services[:1]) == vips
    # Two controllers racing for different services never share an address.
    a, b = ControllerStore(etcd), ControllerStore(etcd)
    more_a = [ServiceKey("shop", f"a{i}") for i in range(10)]
    more_b = [ServiceKey("shop", f"b{i}") for i in range(10)]
    got_a, got_b = await asyncio.gather(a.ensure_vips(more_a), b.ensure_vips(more_b))
    final = await store.vips()
    assert len(final) == 23
    assert len(set(final.values())) == 23
    assert all(final[s] == got_a[s] for s in more_a)
    assert all(final[s] == got_b[s] for s in more_b)
    assert all(not v.endswith((".0", ".255")) for v in final.values())


async def test_a_corrupt_vip_is_reallocated_not_a_deadlock(etcd: Etcd3Client) -> None:
    assert etcd.kv is not None
    await etcd.kv.put(keys.vip_key(ECHO), "not-an-ip")
    await etcd.kv.put(keys.vip_key(DB), "10.255.0.1")
    await etcd.kv.put("/fedgate/vips/bad-key", "10.255.0.2")
    with capture_logs() as logs:
        vips = await ControllerStore(etcd).ensure_vips([ECHO, DB])
    assert vips == {DB: "10.255.0.1", ECHO: "10.255.0.3"}  # .2 is held by the bad key
    events = sorted(entry["event"] for entry in logs if entry["log_level"] == "warning")
    assert events == ["malformed VIP, it will be reallocated", "skipping malformed VIP key"]


async def test_policies_are_written_in_one_transaction_and_pruned(etcd: Etcd3Client) -> None:
    store = ControllerStore(etcd)
    echo = TrafficPolicy(ECHO, (ClusterWeight("local", 80), ClusterWeight("remote", 20)))
    db = TrafficPolicy(DB, (ClusterWeight("west", 1),))
    await store.write_policies([echo, db])
    assert sorted(await store.policies(), key=lambda p: p.key) == [db, echo]
    before = await revision(etcd)
    await store.write_policies([echo])
    assert await revision(etcd) == before + 1
    assert await store.policies() == (echo,)
    await store.write_policies([echo])  # unchanged: no write at all
    assert await revision(etcd) == before + 1


async def test_unreachable_etcd_is_a_store_error() -> None:
    with pytest.raises(StoreUnavailableError):
        await open_client([f"127.0.0.1:{free_port()}"], connect_timeout=2.0)


def test_endpoint_parsing() -> None:
    assert parse_endpoint("127.0.0.1:2379") == ("127.0.0.1", 2379)
    for bad in ("127.0.0.1", ":2379", "host:0", "host:x"):
        with pytest.raises(StoreError, match="host:port"):
            parse_endpoint(bad)
