"""Beyond etcd's per-transaction limit (--max-txn-ops, 128 by default): publish and allocate."""

from __future__ import annotations

import pytest
from etcd3aio import Etcd3Client

from federation.owned import ControllerStore
from federation.store import EtcdCatalogPublisher
from mesh.naming import ServiceKey
from tests.federation.catalog_read import read_catalog
from tests.federation.fed_factories import export, info

pytestmark = [pytest.mark.etcd, pytest.mark.usefixtures("no_leaked_tasks")]


async def test_a_cluster_with_300_exports_publishes_and_300_services_get_vips(
    etcd: Etcd3Client,
) -> None:
    publisher = EtcdCatalogPublisher(etcd, "east", ttl=10)
    exports = [export("east", f"svc{i:03d}") for i in range(300)]
    try:
        await publisher.publish(info("east"), exports)
        assert len((await read_catalog(etcd))[1]) == 300
        # A change to one export writes one key, not 300.
        assert etcd.kv is not None
        before = int((await etcd.kv.get("/x")).header.revision)
        changed = [*exports[:-1], export("east", "svc299", addresses=("10.0.0.9",))]
        await publisher.publish(info("east"), changed)
        assert int((await etcd.kv.get("/x")).header.revision) == before + 1
        vips = await ControllerStore(etcd).ensure_vips(x.key for x in exports)
        assert len(vips) == 300
        assert len(set(vips.values())) == 300
        assert vips[ServiceKey("demo", "svc000")] == "10.255.0.1"
    finally:
        await publisher.aclose()
