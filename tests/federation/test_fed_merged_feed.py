"""The merged catalog agents read back from the leader's service status records (real etcd)."""

from __future__ import annotations

import asyncio

import pytest
from etcd3aio import Etcd3Client

from federation import keys
from federation.merge import merge_service
from federation.merged_feed import EtcdMergedCatalog
from federation.status import service_entry, service_status_from_json
from federation.store import kv_service
from mesh.codec import loads
from mesh.errors import CodecError
from mesh.model import Condition, MergedService, ServiceExport, ServicePort
from mesh.naming import ServiceKey

PAY = ServiceKey("shop", "pay")


def exported(cluster: str, port: int, created: float) -> ServiceExport:
    return ServiceExport(cluster, PAY, (ServicePort("http", port, "HTTP"),), created)


def conflicting() -> tuple[MergedService, tuple[ServiceExport, ...]]:
    exports = (exported("east", 8080, 1.0), exported("west", 9090, 2.0))
    return merge_service(PAY, exports, "10.255.0.7"), exports


def test_a_status_record_reads_back_as_its_merged_service() -> None:
    service, exports = conflicting()
    _, raw = service_entry(service, exports)
    back = service_status_from_json(loads(raw))
    assert back.key == PAY
    assert back.vip == "10.255.0.7"
    assert back.ports == service.ports
    assert back.clusters == ("east", "west")
    assert back.endpoints == ()
    (conflict,) = back.conditions
    assert conflict == service.conditions[0]
    assert (conflict.type, conflict.reason) == ("Conflict", "PortConflict")
    with pytest.raises(CodecError, match="service status record"):
        service_status_from_json({"namespace": "shop", "name": "pay"})


async def test_the_feed_follows_the_records(etcd: Etcd3Client) -> None:
    kv = kv_service(etcd)
    service, exports = conflicting()
    await kv.put(*service_entry(service, exports))
    await kv.put(keys.service_status_key(ServiceKey("shop", "bad")), b"{not json")
    changes = EtcdMergedCatalog(etcd).changes()
    try:
        first = await asyncio.wait_for(anext(changes), 5.0)
        assert [s.key for s in first] == [PAY]  # the malformed record is skipped
        valid = merge_service(PAY, exports[:1], "10.255.0.7")
        await kv.put(*service_entry(valid, exports[:1]))
        second = await asyncio.wait_for(anext(changes), 5.0)
        assert second[0].conditions == (Condition("Valid", True, "Merged", ""),)
        assert second[0].clusters == ("east",)
        await kv.delete(keys.service_status_key(PAY))  # the service left the catalog
        assert await asyncio.wait_for(anext(changes), 5.0) == ()
    finally:
        await changes.aclose()
