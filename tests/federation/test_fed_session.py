"""The config-stream session, both halves wired back to back in memory (no gRPC)."""

from __future__ import annotations

import pytest

from federation.api.config_pb2 import ConfigRequest, ConfigResponse
from federation.api.session import (
    Accepted,
    Ack,
    ClientSession,
    Heartbeat,
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


# --- staleness: the server's current version, heartbeats, a full resync ---------------------


def running_s1() -> tuple[ClientSession, ServerSession, Snapshot]:
    """A client and its server session after the first snapshot was sent and accepted."""
    client = ClientSession(NODE)
    server = ServerSession(client.hello())
    s1, p1 = snapshot("10.0.0.1")
    first = server.offer(s1.version, p1)
    assert first is not None
    assert isinstance(client.receive(first), Accepted)
    return client, server, s1


def test_a_heartbeat_is_not_answered_and_names_the_current_version() -> None:
    client, server, s1 = running_s1()
    beat = server.heartbeat(s1.version)
    assert beat.heartbeat
    assert not beat.nonce
    assert not beat.snapshot
    assert client.receive(beat) == Heartbeat(s1.version)
    assert client.latest == s1


def test_trailing_counts_from_the_first_sight_of_a_version_the_client_does_not_run() -> None:
    client, _, s1 = running_s1()
    s2, _ = snapshot("10.0.0.2")
    client.observe(s1.version, 1.0)
    assert client.trailing_for(9.0) == 0.0
    client.observe(s2.version, 10.0)  # e.g. a heartbeat while s2's response never came
    client.observe(s2.version, 12.0)  # seeing it again does not restart the count
    assert client.trailing_for(13.5) == pytest.approx(3.5)
    client.observe("", 14.0)  # a server that does not say: no opinion
    assert client.trailing_for(14.0) == 0.0
    client.hello()  # a new stream starts afresh
    assert client.trailing_for(20.0) == 0.0


def test_a_refused_version_is_not_trailing() -> None:
    s1, p1 = snapshot("10.0.0.1")
    s2, p2 = snapshot("10.0.0.2")

    def refuse_s2(candidate: Snapshot) -> None:
        if candidate.version == s2.version:
            raise ValueError("no")

    client = ClientSession(NODE, refuse_s2)
    server = ServerSession(client.hello())
    for version, payload in ((s1.version, p1), (s2.version, p2)):
        response = server.offer(version, payload)
        assert response is not None
        client.receive(response)
        client.observe(version, 1.0)
    assert client.latest == s1
    assert client.rejected == s2.version
    assert client.trailing_for(100.0) == 0.0  # it keeps s1 on purpose: no resync loop


def test_a_hello_asking_for_full_gets_the_whole_snapshot_even_when_versions_agree() -> None:
    s1, p1 = snapshot("10.0.0.1")
    client = ClientSession(NODE)
    first = ServerSession(client.hello()).offer(s1.version, p1)
    assert first is not None
    client.receive(first)
    assert ServerSession(client.hello()).offer(s1.version, p1) is None  # the usual shortcut
    server = ServerSession(client.hello(full=True))
    again = server.offer(s1.version, p1, lambda base: b"never a delta")
    assert again is not None
    assert not again.base_version
    assert again.snapshot == p1
    outcome = client.receive(again)
    assert isinstance(outcome, Accepted)
    assert outcome.snapshot == s1
    assert server.offer(s1.version, p1) is None  # only the first response is forced


def test_a_client_that_keeps_accepting_newer_versions_is_not_trailing() -> None:
    client, server, _ = running_s1()
    s2, p2 = snapshot("10.0.0.2")
    s3, _ = snapshot("10.0.0.3")
    client.observe(s3.version, 10.0)  # sustained churn: the server is always ahead
    r2 = server.offer(s2.version, p2)
    assert r2 is not None
    assert isinstance(client.receive(r2), Accepted)  # but the stream moves
    client.observe(s3.version, 12.0)
    assert client.trailing_for(13.0) == pytest.approx(1.0)
