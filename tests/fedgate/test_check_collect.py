"""`fedgate check`'s collector against a real etcd and real admin servers (`fedgate.admin`):
a controller whose `/metrics` names its subscribers and certificates, a gateway's metrics
listener, the leader's `/topology.json` and `/config`; the GitOps commit and rejection in etcd."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest

from federation import keys
from federation.etcd import etcd_client
from federation.gitops.store import COMMIT_KEY, REJECTION_KEY, CommitRecord, Rejection
from federation.status import LeaderRecord
from federation.store import kv_service
from fedgate import admin
from fedgate.check_collect import collect
from fedgate.check_facts import Subscriber
from fedgate.checks import FAIL, OK, evaluate
from tests.etcd_fixture import EtcdServer, reset_etcd
from tests.helpers import free_port

CONTROLLER_METRICS = """\
# TYPE fedgate_controller_leader gauge
fedgate_controller_leader 1.0
# TYPE fedgate_config_version_info gauge
fedgate_config_version_info{component="controller",version="v7"} 1.0
# TYPE fedgate_config_subscriber_version_info gauge
fedgate_config_subscriber_version_info{cluster="east",kind="gateway",node="east-gw",version="v7"} 1
fedgate_config_subscriber_version_info{cluster="west",kind="sidecar",node="west/c",version="v6"} 1
# TYPE fedgate_certificate_expiry_timestamp_seconds gauge
fedgate_certificate_expiry_timestamp_seconds{fingerprint="ab12",identity="spiffe://east.fedgate.local",kind="root",trust_domain="east.fedgate.local"} 1.9e9
fedgate_certificate_expiry_timestamp_seconds{fingerprint="99",identity="spiffe://fedgate.local/ns/fedgate-system/sa/controller",kind="svid",trust_domain="fedgate.local"} 1.9e9
"""  # noqa: E501
GATEWAY_METRICS = """\
# TYPE fedgate_config_version_info gauge
fedgate_config_version_info{component="gateway",version="v7"} 1.0
# TYPE fedgate_certificate_expiry_timestamp_seconds gauge
fedgate_certificate_expiry_timestamp_seconds{fingerprint="77",identity="spiffe://east.fedgate.local/ns/fedgate-system/sa/gateway",kind="svid",trust_domain="east.fedgate.local"} 1.9e9
"""  # noqa: E501


@pytest.fixture(autouse=True)
async def _clean_etcd(etcd_server: EtcdServer) -> AsyncIterator[None]:
    """The session's etcd is shared: a leader record left behind (no lease) would keep every
    later controller from being elected."""
    yield
    async with etcd_client([etcd_server.endpoint]) as client:
        await reset_etcd(client)


@pytest.fixture
async def servers() -> AsyncIterator[tuple[str, str]]:
    """A controller admin port and a gateway metrics listener on loopback."""
    gw_port, ctl_port = free_port(), free_port()
    gateway = await admin.serve(
        admin.AdminState(metrics=lambda: GATEWAY_METRICS, metrics_only=True), "127.0.0.1", gw_port
    )
    topology = {
        "clusters": [{"name": "east", "gateway": {"address": f"127.0.0.1:{gw_port}", "up": True}}],
        "links": [{"source": "east", "destination": "west", "health": "up", "rtt_ms": 0.5}],
    }

    async def topology_json(query: str) -> tuple[int, bytes, str]:
        return 200, json.dumps(topology).encode(), "application/json"

    last = {"result": "rejected", "sha": "b" * 40, "detail": "1 issue"}
    state = admin.AdminState(
        metrics=lambda: CONTROLLER_METRICS, config=lambda: {"gitops": {"last": last}}
    )
    state.pages["topology.json"] = topology_json
    controller = await admin.serve(state, "127.0.0.1", ctl_port)
    yield f"127.0.0.1:{ctl_port}", f"127.0.0.1:{gw_port}"
    for s in (controller, gateway):
        s.close()
        await s.wait_closed()


async def test_collects_every_fact_the_checks_need(
    etcd_server: EtcdServer, servers: tuple[str, str]
) -> None:
    ctl, gw = servers
    async with etcd_client([etcd_server.endpoint]) as client:
        await reset_etcd(client)
        kv = kv_service(client)
        await kv.put(keys.LEADER_KEY, LeaderRecord("controller-0", "g:1", ctl).encode())
        commit = CommitRecord("a" * 40, "main", "weights", "2026-01-01T00:00Z")
        await kv.put(COMMIT_KEY, json.dumps(commit.to_json()).encode())
        issue = {"file": "x.yaml", "document": 1, "line": 3, "field": "spec", "reason": "bad"}
        rejection = Rejection("b" * 40, "2026-01-02T00:00Z", (issue,), 1)
        await kv.put(REJECTION_KEY, json.dumps(rejection.to_json()).encode())

    facts = await collect([etcd_server.endpoint], timeout=2.0)

    assert facts.etcd_error == ""
    assert (facts.leader_id, facts.leader_admin) == ("controller-0", ctl)
    (c,) = facts.controllers
    assert (c.address, c.error, c.leader, c.version) == (ctl, "", True, "v7")
    assert c.subscribers == (
        Subscriber("east-gw", "gateway", "east", "v7"),
        Subscriber("west/c", "sidecar", "west", "v6"),
    )
    assert [(x.kind, x.fingerprint, x.not_after) for x in c.certs] == [
        ("root", "ab12", 1.9e9),
        ("svid", "99", 1.9e9),
    ]
    assert c.clock is not None
    low, high = c.clock.skew_range()
    assert low <= 0.0 <= high  # same host, same clock
    (g,) = facts.gateways
    assert (g.name, g.address, g.version) == ("east", gw, "v7")
    assert [x.identity for x in g.certs] == [
        "spiffe://east.fedgate.local/ns/fedgate-system/sa/gateway"
    ]
    assert [(x.source, x.destination, x.health, x.rtt_ms) for x in facts.links] == [
        ("east", "west", "up", 0.5)
    ]
    assert facts.gitops.applied_sha == "a" * 40
    assert facts.gitops.rejected_sha == "b" * 40
    assert facts.gitops.issues == ("x.yaml:3: document 1: spec: bad",)
    assert facts.gitops.last_result == "rejected"

    results = {r.name: r for r in evaluate(facts, time.time())}
    assert results["no GitOps commit is rejected"].status == FAIL
    assert results["no GitOps commit is rejected"].notes == ("x.yaml:3: document 1: spec: bad",)
    assert results["the config version is acked by every proxy"].status == FAIL
    assert results["clock of gateway east is in sync"].status == OK


async def test_unreachable_components_are_facts_not_exceptions(etcd_server: EtcdServer) -> None:
    dead = f"127.0.0.1:{free_port()}"
    # A wedged process (SIGSTOPped, its loop blocked): the kernel accepts, nothing answers.
    held: list[asyncio.StreamWriter] = []
    wedged = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    stuck = f"127.0.0.1:{wedged.sockets[0].getsockname()[1]}"
    async with etcd_client([etcd_server.endpoint]) as client:
        await reset_etcd(client)
        await kv_service(client).put(
            keys.LEADER_KEY, LeaderRecord("controller-0", "g:1", dead).encode()
        )
    facts = await collect([etcd_server.endpoint], [dead, stuck], timeout=0.5)
    for w in held:
        w.close()
    wedged.close()
    await wedged.wait_closed()
    c, s = facts.controllers  # `dead` named twice (flag and leader record), read once
    assert "Connect call failed" in c.error
    assert s.error == f"http://{stuck}/metrics: no answer within 0.5 s"
    assert "cannot read the leader's topology" in facts.topology_error
    unreachable = await asyncio.wait_for(collect([dead], timeout=0.5), 10)
    assert unreachable.etcd_error
    assert unreachable.controllers == ()
