"""Every MCS merge case end to end: agents publish to a real etcd, the leader writes the status.

For each case the service's status under /fedgate/status/services/ must carry the merged ports
(the oldest export wins a conflict), `Valid` or `Conflict` with the reason, and the condition on
every export; the snapshot the proxies get must agree.
"""

from __future__ import annotations

import json

import pytest
from etcd3aio import Etcd3Client

from federation import keys
from federation.controller import ControllerSettings
from federation.controller_etcd import etcd_controller
from federation.server import SnapshotPublisher
from federation.store import EtcdCatalogPublisher
from mesh.model import ServicePort
from mesh.naming import ServiceKey
from tests.federation.fed_factories import export, info

pytestmark = [pytest.mark.etcd, pytest.mark.usefixtures("no_leaked_tasks")]

ECHO = ServiceKey("demo", "echo")
HTTP = ServicePort("http", 8080, "HTTP")

CASES = {
    # name: (east ports, east created, west ports, west created, merged ports, condition)
    "same-ports": ((HTTP,), 1.0, (HTTP,), 2.0, [("http", 8080, "HTTP")], "Valid"),
    "union-by-name": (
        (HTTP,),
        1.0,
        (ServicePort("grpc", 9090, "GRPC"),),
        2.0,
        [("http", 8080, "HTTP"), ("grpc", 9090, "GRPC")],
        "Valid",
    ),
    "union-unnamed-by-protocol-and-port": (
        (ServicePort("", 6379, "TCP"),),
        1.0,
        (ServicePort("", 6379, "TCP"), ServicePort("", 6380, "TCP")),
        2.0,
        [("", 6379, "TCP"), ("", 6380, "TCP")],
        "Valid",
    ),
    "name-with-another-port: oldest wins": (
        (HTTP,),
        1.0,
        (ServicePort("http", 8081, "HTTP"),),
        2.0,
        [("http", 8080, "HTTP")],
        "Conflict",
    ),
    "name-with-another-protocol: oldest (west) wins": (
        (ServicePort("http", 8080, "HTTP2"),),
        3.0,
        (HTTP,),
        2.0,
        [("http", 8080, "HTTP")],
        "Conflict",
    ),
    "two-names-for-one-port: oldest wins": (
        (HTTP,),
        1.0,
        (ServicePort("web", 8080, "HTTP"),),
        2.0,
        [("http", 8080, "HTTP")],
        "Conflict",
    ),
    "tie on created: cluster name breaks it (east)": (
        (HTTP,),
        5.0,
        (ServicePort("http", 9999, "HTTP"),),
        5.0,
        [("http", 8080, "HTTP")],
        "Conflict",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_mcs_case_is_merged_and_its_condition_written_back(
    etcd: Etcd3Client, case: str
) -> None:
    east_ports, east_created, west_ports, west_created, merged, condition = CASES[case]
    east = EtcdCatalogPublisher(etcd, "east", ttl=5)
    west = EtcdCatalogPublisher(etcd, "west", ttl=5)
    try:
        await east.publish(info("east"), [export("east", ports=east_ports, created=east_created)])
        await west.publish(
            info("west"),
            [export("west", ports=west_ports, created=west_created, addresses=("10.1.0.1",))],
        )
        settings = ControllerSettings(elect=False)
        snapshot = await etcd_controller(etcd, SnapshotPublisher(), settings=settings).sync()
        assert etcd.kv is not None
        found = await etcd.kv.get(keys.service_status_key(ECHO))
        status = json.loads(found.kvs[0].value)
        assert [(p["name"], p["port"], p["protocol"]) for p in status["ports"]] == merged
        assert [c["type"] for c in status["conditions"]] == [condition]
        assert sorted(status["exports"]) == ["east", "west"]
        for per_export in status["exports"].values():
            assert [c["type"] for c in per_export["conditions"]] == [condition]
        if condition == "Conflict":
            message = status["conditions"][0]["message"]
            assert "east" in message
            assert "west" in message
            assert "the oldest export wins" in message
        service = snapshot.service(ECHO)
        assert service is not None
        assert [(p.name, p.port, p.protocol) for p in service.ports] == merged
        assert status["endpoints"] == {"east": 1, "west": 1}
    finally:
        await east.aclose()
        await west.aclose()
