"""Full and delta payloads, the version hash with cached fragments, and resync, back to back."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from federation.api.client import ConfigClient
from federation.api.delta import (
    DeltaBaseError,
    FragmentCache,
    apply_delta,
    encode_delta,
    encode_full,
)
from federation.api.session import (
    Accepted,
    ClientSession,
    NodeInfo,
    Rejected,
    Resync,
    ResyncNeeded,
    ServerSession,
)
from federation.generate import generate
from federation.merge import merge
from federation.server import ConfigDiscoveryServicer, SnapshotPublisher, serve
from mesh.codec import dumps, snapshot_to_json
from mesh.model import ClusterWeight, Snapshot, TrafficPolicy
from mesh.naming import ServiceKey
from tests.federation.fed_factories import export, info
from tests.helpers import until
from tests.wires import wire  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("no_leaked_tasks", "wire")

ECHO = ServiceKey("demo", "echo")
POLICY = TrafficPolicy(ECHO, (ClusterWeight("local", 70), ClusterWeight("remote", 30)))


def build(
    east: tuple[str, ...] = ("10.0.0.1",),
    services: tuple[str, ...] = ("echo", "db", "web", "api", "auth", "cart"),
    clusters: tuple[str, ...] = ("east", "west"),
    cache: FragmentCache | None = None,
) -> Snapshot:
    infos = [info(c) for c in clusters]
    # `east` are echo's endpoints in east: a change there touches one service.
    exports = [
        export("east", name, addresses=east if name == "echo" else ("10.0.0.1",))
        for name in services
    ]
    exports += [export("west", name, addresses=("10.1.0.1",)) for name in services]
    vips = {ServiceKey("demo", n): f"10.255.0.{i + 1}" for i, n in enumerate(services)}
    return generate(infos, merge(infos, exports, vips), [POLICY], cache=cache)


def test_full_payload_is_byte_identical_to_the_codec() -> None:
    snapshot = build()
    cache = FragmentCache()
    assert encode_full(snapshot, cache) == dumps(snapshot_to_json(snapshot))
    assert encode_full(snapshot, cache) == dumps(snapshot_to_json(snapshot))  # from the cache


@pytest.mark.parametrize(
    "new",
    [
        build(east=("10.0.0.1", "10.0.0.2")),  # an endpoint added
        build(services=("echo", "db", "web", "api", "auth")),  # a service removed
        build(services=("echo", "db", "web", "api", "auth", "cart", "more")),  # one added
        build(clusters=("east",)),  # a cluster lost: everything but services changes too
    ],
    ids=["endpoint", "removed", "added", "cluster"],
)
def test_delta_rebuilds_exactly_the_new_snapshot(new: Snapshot) -> None:
    base = build()
    delta = encode_delta(base, new)
    assert apply_delta(base, delta) == replace(
        new, trust_bundle=apply_delta(base, delta).trust_bundle
    )
    assert dict(apply_delta(base, delta).trust_bundle) == dict(new.trust_bundle)
    assert len(delta) < len(encode_full(new)) or new.clusters != base.clusters


def test_delta_against_another_version_is_refused() -> None:
    base, new = build(), build(east=("10.0.0.9",))
    with pytest.raises(DeltaBaseError):
        apply_delta(new, encode_delta(base, new))


def test_version_is_the_same_with_a_cache_and_unchanged_services_are_not_reencoded() -> None:
    cache = FragmentCache()
    first = build(cache=cache)
    assert first.version == build().version
    encoded = cache.encoded
    # Re-merging builds new (equal) objects: equal objects hit the cache too.
    assert build(cache=cache).version == first.version
    assert cache.encoded == encoded
    changed = build(east=("10.0.0.1", "10.0.0.2"), cache=cache)
    assert changed.version != first.version
    assert cache.encoded == encoded + 1  # only echo changed


def history(*snapshots: Snapshot) -> dict[str, Snapshot]:
    return {s.version: s for s in snapshots}


def test_session_sends_a_delta_the_client_applies_and_acks() -> None:
    s1, s2 = build(), build(east=("10.0.0.1", "10.0.0.2"))
    known = history(s1, s2)

    def delta_to(target: Snapshot) -> object:
        return lambda base: encode_delta(known[base], target) if base in known else None

    client = ClientSession(NodeInfo("sc", "east"))
    server = ServerSession(client.hello())
    first = server.offer(s1.version, dumps(snapshot_to_json(s1)), delta_to(s1))  # type: ignore[arg-type]
    assert first is not None
    assert first.base_version == ""  # nothing to delta from yet
    accepted = client.receive(first)
    assert isinstance(accepted, Accepted)
    server.receive(accepted.ack)
    second = server.offer(s2.version, lambda: b"unused", delta_to(s2))  # type: ignore[arg-type]
    assert second is not None
    assert second.base_version == s1.version
    outcome = client.receive(second)
    assert isinstance(outcome, Accepted)
    assert outcome.snapshot == replace(s2, trust_bundle=outcome.snapshot.trust_bundle)
    assert client.deltas == 1


def test_a_delta_after_a_nack_triggers_a_resync_then_a_full_snapshot() -> None:
    s1, s2, s3 = build(), build(east=("10.0.0.2",)), build(east=("10.0.0.3",))
    known = history(s1, s2, s3)

    def refuse_s2(candidate: Snapshot) -> None:
        if candidate.version == s2.version:
            raise ValueError("no")

    client = ClientSession(NodeInfo("sc", "east"), refuse_s2)
    server = ServerSession(client.hello())

    def offer(s: Snapshot) -> object:
        return server.offer(
            s.version,
            lambda: dumps(snapshot_to_json(s)),
            lambda base: encode_delta(known[base], s) if base in known else None,
        )

    r1 = offer(s1)
    a1 = client.receive(r1)  # type: ignore[arg-type]
    assert isinstance(a1, Accepted)
    r2 = offer(s2)  # sent before the ACK of s1 arrives: a delta against s1 anyway
    r3 = offer(s3)  # a delta against s2, which the client will refuse
    assert r2 is not None
    assert r3 is not None
    assert r3.base_version == s2.version
    assert isinstance(client.receive(r2), Rejected)
    needed = client.receive(r3)
    assert isinstance(needed, ResyncNeeded)
    assert server.receive(needed.request) == Resync(kept=s1.version)
    again = offer(s3)  # what the driver does on Resync: offer the current version again
    assert again is not None
    assert again.base_version == s1.version  # a delta from what the client really runs
    final = client.receive(again)  # type: ignore[arg-type]
    assert isinstance(final, Accepted)
    assert final.snapshot.version == s3.version


async def test_streams_get_deltas_over_grpc_and_equal_snapshots() -> None:
    publisher = SnapshotPublisher()
    servicer = ConfigDiscoveryServicer(publisher, replica="r0")
    running = await serve(servicer, "127.0.0.1:0", None)
    c = ConfigClient(f"127.0.0.1:{running.port}", node_id="sc", cluster="east", insecure=True)
    stream = c.snapshots()
    try:
        publisher.update(build())
        assert (await asyncio.wait_for(anext(stream), 5.0)).version == build().version
        for n in range(2, 6):
            new = build(east=tuple(f"10.0.0.{i}" for i in range(1, n + 1)))
            publisher.update(new)
            got = await asyncio.wait_for(anext(stream), 5.0)
            assert got == replace(new, trust_bundle=got.trust_bundle)
        assert c.deltas == 4
        assert c.replica == "r0"
        await until(lambda: servicer.deltas == 4 and servicer.fulls == 1)
        assert publisher.full_encodings == 1  # nobody needed the full payload of later versions
    finally:
        await stream.aclose()
        await running.stop(None)
