"""The config-stream session, both halves wired back to back in memory (no gRPC)."""

from __future__ import annotations

import pytest

from federation.api.config_pb2 import ConfigRequest, ConfigResponse
from federation.api.session import (
    Accepted,
    Ack,
    ClientSession,
    Nack,
    NodeInfo,
    Rejected,
    ServerSession,
    Stale,
)
from federation.generate import generate
from federation.merge import merge
from mesh.codec import dumps, snapshot_to_json
from mesh.model import Snapshot
from tests.federation.fed_factories import export, info

NODE = NodeInfo("sidecar~east~echo-1", "east", "sidecar")


def snapshot(*addresses: str) -> tuple[Snapshot, bytes]:
    clusters = [info("east")]
    snap = generate(clusters, merge(clusters, [export("east", addresses=addresses)], {}), [])
    return snap, dumps(snapshot_to_json(snap))


def test_ack_flow() -> None:
    client = ClientSession(NODE)
    hello = client.hello()
    assert hello.version_info == ""
    assert hello.node.id == NODE.id
    server = ServerSession(hello)
    assert server.node == NODE
    s1, p1 = snapshot("10.0.0.1")
    response = server.offer(s1.version, p1)
    assert response is not None
    assert response.version_info == s1.version
    assert server.offer(s1.version, p1) is None  # nothing new
    outcome = client.receive(response)
    assert isinstance(outcome, Accepted)
    assert outcome.snapshot == s1
    assert outcome.ack.version_info == s1.version
    assert outcome.ack.response_nonce == response.nonce
    assert server.receive(outcome.ack) == Ack(s1.version)
    assert client.latest == s1


def test_nack_keeps_last_good_and_later_versions_still_flow() -> None:
    client = ClientSession(NODE)
    server = ServerSession(client.hello())
    s1, p1 = snapshot("10.0.0.1")
    first = server.offer(s1.version, p1)
    assert first is not None
    accepted = client.receive(first)
    assert isinstance(accepted, Accepted)
    server.receive(accepted.ack)

    bad = server.offer("v-bad", b"{not json")
    assert bad is not None
    outcome = client.receive(bad)
    assert isinstance(outcome, Rejected)
    assert "not valid JSON" in outcome.error
    assert outcome.nack.version_info == s1.version  # the last good version
    assert outcome.nack.response_nonce == bad.nonce
    assert server.receive(outcome.nack) == Nack(
        rejected="v-bad", kept=s1.version, error=outcome.error
    )
    assert client.latest == s1
    assert server.offer("v-bad", b"{not json") is None  # a NACKed version is not resent

    s2, p2 = snapshot("10.0.0.2")
    second = server.offer(s2.version, p2)
    assert second is not None
    assert isinstance(client.receive(second), Accepted)
    assert client.latest == s2


def test_response_whose_version_disagrees_with_its_snapshot_is_nacked() -> None:
    client = ClientSession(NODE)
    _s1, p1 = snapshot("10.0.0.1")
    outcome = client.receive(ConfigResponse(version_info="other", nonce="1", snapshot=p1))
    assert isinstance(outcome, Rejected)
    assert "version_info" in outcome.error


def test_validator_can_refuse_a_decodable_snapshot() -> None:
    def refuse(_: Snapshot) -> None:
        raise ValueError("cannot apply: too many endpoints")

    client = ClientSession(NODE, validate=refuse)
    s1, p1 = snapshot("10.0.0.1")
    outcome = client.receive(ConfigResponse(version_info=s1.version, nonce="1", snapshot=p1))
    assert isinstance(outcome, Rejected)
    assert outcome.error == "cannot apply: too many endpoints"
    assert client.latest is None


def test_reconnect_with_current_version_gets_nothing() -> None:
    client = ClientSession(NODE)
    s1, p1 = snapshot("10.0.0.1")
    assert isinstance(
        client.receive(ConfigResponse(version_info=s1.version, nonce="1", snapshot=p1)), Accepted
    )
    server = ServerSession(client.hello())  # a new stream, e.g. after a controller restart
    assert server.offer(s1.version, p1) is None
    s2, p2 = snapshot("10.0.0.2")
    assert server.offer(s2.version, p2) is not None


@pytest.mark.parametrize("nonce", ["", "0", "7"])
def test_requests_with_another_nonce_are_stale(nonce: str) -> None:
    server = ServerSession(ConfigRequest(node=NODE.to_proto()))
    s1, p1 = snapshot("10.0.0.1")
    assert server.offer(s1.version, p1) is not None  # nonce "1"
    assert server.receive(ConfigRequest(version_info="x", response_nonce=nonce)) == Stale(nonce)


def test_answer_to_an_older_response_still_counts() -> None:
    client = ClientSession(NODE)
    server = ServerSession(client.hello())
    s1, p1 = snapshot("10.0.0.1")
    s2, p2 = snapshot("10.0.0.2")
    r1 = server.offer(s1.version, p1)
    r2 = server.offer(s2.version, p2)  # sent before the client answered r1
    assert r1 is not None
    assert r2 is not None
    a1 = client.receive(r1)
    a2 = client.receive(r2)
    assert isinstance(a1, Accepted)
    assert isinstance(a2, Accepted)
    assert server.receive(a1.ack) == Ack(s1.version)
    assert server.receive(a1.ack) == Stale(r1.nonce)  # answered already
    assert server.receive(a2.ack) == Ack(s2.version)
    assert server.client_version == s2.version
