"""The request metrics' `route` and workload labels, as the source's record fills them."""

from __future__ import annotations

from mesh import telemetry as tm
from mesh.model import Endpoint
from mesh.naming import SpiffeId
from sidecar.traffic.balance import Target
from sidecar.traffic.record import RequestRecord


def _id(sa: str, td: str = "west.fedgate.local") -> SpiffeId:
    return SpiffeId(td, "demo", sa)


def test_the_route_is_the_matched_one_or_default() -> None:
    rec = RequestRecord()
    rec.routed("canary", _id("client", "east.fedgate.local"))
    assert (rec.route, rec.source_workload) == ("canary", "client")
    rec = RequestRecord()
    rec.routed("", None)
    assert (rec.route, rec.source_workload) == (tm.DEFAULT_ROUTE, tm.UNKNOWN)


def test_the_destination_workload_is_the_endpoint_identity() -> None:
    ep = Endpoint("east", "10.1.0.5", "echo-7d9f-abcde", _id("echo", "east.fedgate.local"))
    rec = RequestRecord()
    rec.went_to(Target("east", ep, frozenset({ep.identity})))
    assert rec.destination_workload == "echo"


def test_a_remote_cluster_names_its_workload_only_when_its_endpoints_share_one() -> None:
    rec = RequestRecord()
    rec.went_to(Target("west", None, frozenset({_id("echo")})))
    assert rec.destination_workload == "echo"
    rec = RequestRecord()
    rec.went_to(Target("west", None, frozenset({_id("echo"), _id("echo-v2")})))
    assert rec.destination_workload == tm.UNKNOWN


def test_the_workload_is_the_service_account() -> None:
    assert tm.workload(_id("payments")) == "payments"
    assert tm.workload(None) == tm.UNKNOWN
