"""etcd auth: each agent writes only its own cluster's prefix; the controller works as usual.

A dedicated etcd (auth cannot be turned off again for the shared one), provisioned with
federation.etcd_auth.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from etcd3aio import prefix_range_end

from federation import keys
from federation.controller import ControllerSettings
from federation.controller_etcd import etcd_controller
from federation.errors import StoreAuthError
from federation.etcd import EtcdCredentials, open_client
from federation.etcd_auth import CONTROLLER_USER, READER_USER, agent_user, grants, provision
from federation.server import SnapshotPublisher
from federation.store import EtcdCatalogPublisher
from mesh.codec import cluster_to_json, dumps
from tests.etcd_fixture import EtcdServer, find_etcd
from tests.federation.fed_factories import export, info

pytestmark = [pytest.mark.etcd, pytest.mark.usefixtures("no_leaked_tasks")]

PASSWORDS = {
    agent_user("east"): "east-secret",
    agent_user("west"): "west-secret",
    CONTROLLER_USER: "controller-secret",
    READER_USER: "reader-secret",
}


def creds(user: str) -> EtcdCredentials:
    return EtcdCredentials(user, PASSWORDS[user])


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    binary = find_etcd()
    assert binary is not None
    server = EtcdServer(binary, tmp_path_factory.mktemp("etcd-auth"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def provisioned(auth_etcd: EtcdServer) -> str:
    async def setup() -> None:
        client = await open_client([auth_etcd.endpoint])
        try:
            await provision(client, "root-secret", PASSWORDS, ["east", "west"])
        finally:
            await client.close()

    asyncio.run(setup())  # once per module, on its own loop
    return auth_etcd.endpoint


def test_the_role_table() -> None:
    table = grants(["east"])
    assert table[agent_user("east")].prefix == "/fedgate/clusters/east/"
    assert table[CONTROLLER_USER].prefix == "/fedgate/"


async def test_an_agent_writes_its_own_prefix_and_nothing_else(provisioned: str) -> None:
    east_client = await open_client([provisioned], credentials=creds(agent_user("east")))
    west_client = await open_client([provisioned], credentials=creds(agent_user("west")))
    east = EtcdCatalogPublisher(east_client, "east", ttl=5)
    west = EtcdCatalogPublisher(west_client, "west", ttl=5)
    try:
        await east.publish(info("east"), [export("east")])
        await west.publish(info("west"), [export("west")])
        assert east_client.kv is not None
        assert east_client.lease is not None
        # East forging west's info, deleting west's export, reading the VIPs, revoking
        # west's lease: all refused by etcd.
        with pytest.raises(StoreAuthError):
            await _as_store(
                east_client.kv.put(keys.info_key("west"), dumps(cluster_to_json(info("east"))))
            )
        with pytest.raises(StoreAuthError):
            await _as_store(east_client.kv.delete(keys.export_key("west", export("west").key)))
        with pytest.raises(StoreAuthError):
            await _as_store(east_client.kv.put(keys.vip_key(export("east").key), b"10.255.0.9"))
        assert west.lease_id is not None
        with pytest.raises(StoreAuthError):
            await _as_store(east_client.lease.revoke(west.lease_id))
        # The service status records (MCS write-back) and the deny list: read, never written.
        status = keys.service_status_key(export("east").key)
        for prefix in (keys.SERVICE_STATUS_PREFIX, keys.DENIED_PREFIX):
            await _as_store(east_client.kv.get(prefix, prefix_range_end(prefix)))
        with pytest.raises(StoreAuthError):
            await _as_store(east_client.kv.put(status, b"{}"))

        # The controller sees both clusters and allocates VIPs as usual.
        ctl_client = await open_client([provisioned], credentials=creds(CONTROLLER_USER))
        try:
            settings = ControllerSettings(elect=False)
            snapshot = await etcd_controller(
                ctl_client, SnapshotPublisher(), settings=settings
            ).sync()
        finally:
            await ctl_client.close()
        assert [c.name for c in snapshot.clusters] == ["east", "west"]
        assert snapshot.services[0].vip == "10.255.0.1"
        assert {e.cluster for e in snapshot.services[0].endpoints} == {"east", "west"}
    finally:
        await east.aclose()
        await west.aclose()
        await east_client.close()
        await west_client.close()


async def test_wrong_or_missing_credentials_are_refused(provisioned: str) -> None:
    with pytest.raises(StoreAuthError):
        await open_client([provisioned], credentials=EtcdCredentials(agent_user("east"), "wrong"))
    anonymous = await open_client([provisioned], check=False)
    try:
        assert anonymous.kv is not None
        with pytest.raises(StoreAuthError):
            await _as_store(anonymous.kv.get("/fedgate/", b"/fedgate0"))
    finally:
        await anonymous.close()


async def _as_store(call: object) -> object:
    from federation.etcd import store_errors

    with store_errors("test"):
        return await call  # type: ignore[misc]
