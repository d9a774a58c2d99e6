"""The outbound's route step (`sidecar.steer`): destination -> target, and the log fields of
where a per-connection call went. A route table from a hand-made snapshot; no sockets."""

from __future__ import annotations

import pytest

from sidecar.http.exchange import Dialed
from sidecar.pipe import Conn
from sidecar.routes import Egress, Local, Remote, RouteTable
from sidecar.steer import PASSTHROUGH, Access, Leg, Mesh, Passthrough, Refused, steer
from tests.sidecar.conftest import PAYMENTS, cluster, endpoint, snapshot, spiffe

VIP = "127.77.0.10"
EP = endpoint("east", "10.1.0.5", "payments-0")


def table() -> RouteTable:
    clusters = (cluster("east", ("127.0.0.1", 15443)), cluster("west", ("127.0.0.1", 25443)))
    return RouteTable.build(snapshot(clusters=clusters, endpoints=(EP,), vip=VIP), "east")


def test_a_mesh_vip_and_port_is_routed() -> None:
    target = steer(table(), (VIP, 8080))
    assert isinstance(target, Mesh)
    assert target.route.service == PAYMENTS
    assert target.route.port.port == 8080


def test_a_mesh_vip_without_that_port_is_refused() -> None:
    assert steer(table(), (VIP, 9090)) == Refused(
        "unknown port", f"mesh VIP {VIP} has no port 9090"
    )


@pytest.mark.parametrize("dst", [("10.1.0.5", 8080), ("127.77.0.11", 8080), ("93.184.216.34", 443)])
def test_anything_else_passes_through_to_where_the_app_was_going(dst: tuple[str, int]) -> None:
    # An endpoint's own address is not a VIP: the app chose it, the mesh does not route it.
    assert steer(table(), dst) == Passthrough(*dst)


def test_an_empty_table_routes_nothing() -> None:
    empty = RouteTable.build(snapshot(endpoints=(), vip=VIP), "east")
    assert isinstance(steer(empty, (VIP, 8080)), Mesh)  # the service exists, without endpoints
    assert steer(empty, ("127.77.0.99", 8080)) == Passthrough("127.77.0.99", 8080)


def test_a_leg_says_where_a_decision_led() -> None:
    ids = frozenset({EP.identity})
    assert Leg.of(Local(EP, ids), "east") == Leg(dst_cluster="east", endpoint="10.1.0.5")
    remote = Remote("west", Egress("127.0.0.1", 15443), ids)
    assert Leg.of(remote, "east") == Leg(dst_cluster="west", gateway="127.0.0.1:15443")


def test_access_fields_of_a_failed_mesh_call() -> None:
    route = steer(table(), (VIP, 8080))
    assert isinstance(route, Mesh)
    leg = Leg(dst_cluster="west", gateway="127.0.0.1:15443")
    assert Access(route.route, leg, tries=2).log_fields() == {
        "service": str(PAYMENTS),
        "port": 8080,
        "dst_cluster": "west",
        "gateway": "127.0.0.1:15443",
        "tries": 2,
    }
    # One try is the norm and is not said; a call refused before any try names the route only.
    assert "tries" not in Access(route.route, leg, tries=1).log_fields()
    assert Access(route.route).log_fields() == {"service": str(PAYMENTS), "port": 8080}


async def test_access_fields_of_a_relayed_call() -> None:
    # A Conn wants a running loop (its `closed` future); nothing here touches a socket.
    route = steer(table(), (VIP, 8080))
    assert isinstance(route, Mesh)
    peer = spiffe("east.fedgate.local", "payments")
    dialed = Dialed(Conn("upstream"), peer, tls_resumed=True, smux="s1/3")
    leg = Leg(dst_cluster="east", endpoint="10.1.0.5")
    assert Access(route.route, leg, dialed=dialed).log_fields() == {
        "service": str(PAYMENTS),
        "port": 8080,
        "dst_cluster": "east",
        "endpoint": "10.1.0.5",
        "peer": peer.uri,
        "tls_resumed": True,
        "smux": "s1/3",
    }
    plain = Dialed(Conn("upstream"), peer)
    assert "smux" not in Access(route.route, leg, dialed=plain).log_fields()


def test_access_fields_of_a_passthrough() -> None:
    assert Access(None, PASSTHROUGH).log_fields() == {"mode": "passthrough"}
