"""The Kubernetes cluster source against the faithful fake API server, through the unmodified
`kubernetes` client: slices, conditions, renames, deletions, 410 relists, restarts, drops."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from clusters.kube.source import KubeClusterSource
from mesh.interfaces import ClusterSource
from mesh.model import ServicePort
from tests.clusters.kube_objects import (
    NS,
    endpoint,
    endpoint_slice,
    pod,
    service,
    service_export,
)
from tests.clusters.kube_rig import FAST, TD, Recorder, until, write_kubeconfig
from tests.kubefake import FakeKubeAPI
from tests.kubefake.resources import ENDPOINTSLICES, PODS, SERVICEEXPORTS, SERVICES

KINDS = ("ServiceExport", "Service", "EndpointSlice", "Pod")


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    # Every watch event arrives split over two chunks: the source must reassemble lines.
    with FakeKubeAPI(bearer_tokens={"agent-token"}, split_events=True) as fake:
        yield fake


def _source(api: FakeKubeAPI, tmp_path: Path, **kw: Any) -> KubeClusterSource:
    config = write_kubeconfig(tmp_path / "kubeconfig", api.url, token="agent-token")
    return KubeClusterSource.from_kubeconfig(config, "east", TD, settings=FAST, **kw)


@pytest.fixture
async def run(api: FakeKubeAPI, tmp_path: Path) -> AsyncIterator[Recorder]:
    source = _source(api, tmp_path, debounce=0.05)
    rec = Recorder(source)
    yield rec
    await rec.aclose()
    source.close()
    # Stopping the source stops its informer threads (a leaked thread fails the test).
    assert not [t for t in threading.enumerate() if t.name.startswith("informer:")]


def seed_payments(api: FakeKubeAPI, *pods: str) -> None:
    s = api.store
    s.create(SERVICES, service("pay", ("http", 8080, "http"), ("grpc", 9090, "grpc")))
    s.create(SERVICEEXPORTS, service_export("pay"))
    for i, name in enumerate(pods):
        s.create(PODS, pod(name, "payments", version=f"v{i % 2 + 1}"))
    eps = [endpoint(f"10.0.0.{i + 1}", name) for i, name in enumerate(pods)]
    s.create(ENDPOINTSLICES, endpoint_slice("pay-a", "pay", *eps))


def test_is_a_cluster_source(api: FakeKubeAPI, tmp_path: Path) -> None:
    source: ClusterSource = _source(api, tmp_path)
    assert source is not None


async def test_first_publish_is_the_complete_synced_view_of_exported_services(
    api: FakeKubeAPI, tmp_path: Path
) -> None:
    seed_payments(api, "p1")
    api.store.create(SERVICES, service("cart", ("http", 80, None)))  # not exported
    source = _source(api, tmp_path)
    rec = Recorder(source)
    try:
        await until(lambda: rec.latest is not None, "the first publish")
        # Published only once every informer listed: never a partial view (e.g. no endpoints).
        (x,) = rec.values[0]
        assert x.ports == (ServicePort("http", 8080, "HTTP"), ServicePort("grpc", 9090, "GRPC"))
        assert [e.address for e in x.endpoints] == ["10.0.0.1"]
        assert x.endpoints[0].identity.uri == f"spiffe://{TD}/ns/{NS}/sa/payments"
        assert x.endpoints[0].labels == (("version", "v1"),)
    finally:
        await rec.aclose()
        source.close()


async def test_several_slices_per_service(api: FakeKubeAPI, run: Recorder) -> None:
    seed_payments(api, "p1", "p2")
    for name in ("p3", "p4"):
        api.store.create(PODS, pod(name, "payments"))
    api.store.create(
        ENDPOINTSLICES,
        endpoint_slice("pay-b", "pay", endpoint("10.0.1.3", "p3"), endpoint("10.0.1.4", "p4")),
    )
    want = {"10.0.0.1", "10.0.0.2", "10.0.1.3", "10.0.1.4"}
    await until(lambda: run.addresses("pay") == want, "endpoints of both slices")
    api.store.delete(ENDPOINTSLICES, NS, "pay-a")
    await until(lambda: run.addresses("pay") == {"10.0.1.3", "10.0.1.4"}, "pay-a's endpoints gone")


async def test_not_ready_and_terminating_endpoints_take_no_new_calls(
    api: FakeKubeAPI, run: Recorder
) -> None:
    seed_payments(api, "p1", "p2")
    await until(lambda: run.addresses("pay") == {"10.0.0.1", "10.0.0.2"}, "both endpoints")
    sl = api.store.get(ENDPOINTSLICES, NS, "pay-a")
    sl["endpoints"][0]["conditions"] = {"ready": False, "serving": True, "terminating": True}
    sl["endpoints"][1]["conditions"] = {"ready": False}
    api.store.update(ENDPOINTSLICES, sl)
    await until(lambda: run.addresses("pay") == set(), "terminating and not-ready withdrawn")
    sl = api.store.get(ENDPOINTSLICES, NS, "pay-a")
    sl["endpoints"][1]["conditions"] = {"ready": True, "serving": True, "terminating": False}
    api.store.update(ENDPOINTSLICES, sl)
    await until(lambda: run.addresses("pay") == {"10.0.0.2"}, "the endpoint ready again")
    # A Service with publishNotReadyAddresses keeps `ready` true while a pod terminates:
    # terminating still wins (no new calls), and unset conditions mean ready.
    sl = api.store.get(ENDPOINTSLICES, NS, "pay-a")
    sl["endpoints"][0]["conditions"] = {}
    sl["endpoints"][1]["conditions"] = {"ready": True, "serving": True, "terminating": True}
    api.store.update(ENDPOINTSLICES, sl)
    await until(lambda: run.addresses("pay") == {"10.0.0.1"}, "unset ready, ready-terminating")


async def test_service_port_renamed(api: FakeKubeAPI, run: Recorder) -> None:
    seed_payments(api, "p1")
    await until(lambda: run.export("pay") is not None, "pay")
    svc = api.store.get(SERVICES, NS, "pay")
    svc["spec"]["ports"][0]["name"] = "web"
    api.store.update(SERVICES, svc)
    await until(
        lambda: [p.name for p in run.export("pay").ports] == ["web", "grpc"],  # type: ignore[union-attr]
        "the renamed port",
    )


async def test_export_deleted(api: FakeKubeAPI, run: Recorder) -> None:
    seed_payments(api, "p1")
    await until(lambda: run.export("pay") is not None, "pay")
    api.store.delete(SERVICEEXPORTS, NS, "pay")
    await until(lambda: run.latest == (), "pay withdrawn")
    assert api.store.get(SERVICES, NS, "pay")  # the Service itself is untouched


async def test_relist_after_410_loses_nothing_and_duplicates_nothing(
    api: FakeKubeAPI, run: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "fedgate.clusters.kube")
    seed_payments(api, "p1")
    api.store.create(SERVICES, service("cart", ("http", 80, None)))
    api.store.create(SERVICEEXPORTS, service_export("cart"))
    await until(lambda: {x.key.name for x in run.latest or ()} == {"pay", "cart"}, "both exports")
    await until(lambda: all(run.stats(k)["watches"] for k in KINDS), "every watch open")
    published = len(run.values)

    # While the API server is down, everything changes and etcd compacts past every version
    # the informers hold: their watches must answer 410 and they must relist.
    api.stop()
    s = api.store
    s.create(PODS, pod("p2", "payments"))
    sl = s.get(ENDPOINTSLICES, NS, "pay-a")
    sl["endpoints"].append(endpoint("10.0.0.2", "p2"))
    s.update(ENDPOINTSLICES, sl)
    s.delete(SERVICEEXPORTS, NS, "cart")
    s.create(SERVICES, service("shipping", ("tcp", 7000, None)))
    s.create(SERVICEEXPORTS, service_export("shipping"))
    api.compact()
    api.start()

    await until(
        lambda: (
            {x.key.name for x in run.latest or ()} == {"pay", "shipping"}
            and run.addresses("pay") == {"10.0.0.1", "10.0.0.2"}
        ),
        "the state after the outage",
    )
    await until(lambda: all(run.stats(k)["lists"] == 2 for k in KINDS), "one relist each")
    assert "relisting" in caplog.text
    assert "Expired" in caplog.text
    stats = {k: run.stats(k) for k in KINDS}
    # Each object was applied exactly once per real change: seed + what changed while down.
    assert stats["ServiceExport"]["applied"] == 2 + 2  # cart deleted, shipping added
    assert stats["Service"]["applied"] == 2 + 1  # shipping added; pay and cart unchanged
    assert stats["EndpointSlice"]["applied"] == 1 + 1  # pay-a modified
    assert stats["Pod"]["applied"] == 1 + 1  # p2 added; p1 unchanged
    assert all(stats[k]["duplicates"] == 0 for k in KINDS)
    after = run.values[published:]
    assert all(a != b for a, b in itertools.pairwise(after))  # no value twice
    assert run.values[-1] == after[-1]


async def test_fake_restarted_under_a_watch_resumes_without_relisting(
    api: FakeKubeAPI, run: Recorder
) -> None:
    seed_payments(api, "p1")
    await until(lambda: run.addresses("pay") == {"10.0.0.1"}, "pay")
    await until(lambda: all(run.stats(k)["watches"] for k in KINDS), "every watch open")
    api.restart()
    api.store.create(PODS, pod("p2", "payments"))
    sl = api.store.get(ENDPOINTSLICES, NS, "pay-a")
    sl["endpoints"].append(endpoint("10.0.0.2", "p2"))
    api.store.update(ENDPOINTSLICES, sl)
    await until(lambda: run.addresses("pay") == {"10.0.0.1", "10.0.0.2"}, "change after restart")
    await until(
        lambda: all(int(str(run.stats(k)["watches"])) >= 2 for k in KINDS), "every watch back"
    )
    for k in KINDS:
        assert run.stats(k)["lists"] == 1, k  # resumed from its resourceVersion
        assert run.stats(k)["duplicates"] == 0, k


@pytest.mark.parametrize("partial", [False, True], ids=["between-events", "mid-event"])
async def test_watch_dropped_mid_stream_resumes_and_applies_no_half_event(
    api: FakeKubeAPI, run: Recorder, partial: bool
) -> None:
    seed_payments(api, "p1")
    await until(lambda: run.addresses("pay") == {"10.0.0.1"}, "pay")
    await until(lambda: all(run.stats(k)["watches"] for k in KINDS), "every watch open")
    api.drop_watches(partial=partial)
    api.store.delete(PODS, NS, "p1")
    api.store.delete(ENDPOINTSLICES, NS, "pay-a")
    await until(lambda: run.addresses("pay") == set(), "the deletions after the drop")
    await until(lambda: all(run.stats(k)["errors"] for k in KINDS), "every drop noticed")
    for k in KINDS:
        assert run.stats(k)["lists"] == 1, k
        assert run.stats(k)["duplicates"] == 0, k


async def test_bookmarks_advance_the_resume_version(api: FakeKubeAPI, run: Recorder) -> None:
    seed_payments(api, "p1")
    await until(lambda: run.export("pay") is not None, "pay")
    await until(lambda: run.stats("Pod")["watches"] == 1, "the pod watch open")
    for i in range(3):  # versions move on without any pod changing
        api.store.create(SERVICES, service(f"other{i}", ("http", 80, None)))
    api.bookmark_now()
    current = str(api.store.rv)
    await until(lambda: run.stats("Pod")["resourceVersion"] == current, "the bookmark applied")
    api.drop_watches()
    await until(lambda: len(api.watch_requests("pods")) == 2, "the pod watch reopened")
    assert api.watch_requests("pods")[-1].query["resourceVersion"] == current
    assert api.watch_requests("pods")[-1].query["allowWatchBookmarks"] == "true"


async def test_each_rejected_object_is_logged_once_with_kind_namespace_name_reason(
    api: FakeKubeAPI, run: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "fedgate.clusters.kube")
    api.store.create(SERVICEEXPORTS, service_export("ghost"))
    seed_payments(api, "p1")

    def rejected() -> list[logging.LogRecord]:
        # Only ghost's: while the informers start, pay may be seen briefly without its
        # Service (listed before it was created), which is rightly logged too.
        return [r for r in caplog.records if "rejected ServiceExport shop/ghost" in r.getMessage()]

    await until(lambda: len(rejected()) == 1, "the rejection logged")
    assert rejected()[0].getMessage() == (
        "cluster east: rejected ServiceExport shop/ghost: no Service shop/ghost to export"
    )
    api.store.create(PODS, pod("p9", "payments"))  # another publish-worthy change
    sl = api.store.get(ENDPOINTSLICES, NS, "pay-a")
    sl["endpoints"].append(endpoint("10.0.0.9", "p9"))
    api.store.update(ENDPOINTSLICES, sl)
    await until(lambda: "10.0.0.9" in run.addresses("pay"), "the new endpoint")
    assert len(rejected()) == 1


async def test_a_burst_of_changes_is_one_debounced_publish(
    api: FakeKubeAPI, tmp_path: Path
) -> None:
    seed_payments(api)
    source = _source(api, tmp_path, debounce=0.5)
    rec = Recorder(source)
    try:
        await until(lambda: rec.export("pay") is not None, "pay")
        before = len(rec.values)
        eps = []
        for i in range(30):
            api.store.create(PODS, pod(f"b{i}", "payments"))
            eps.append(endpoint(f"10.0.2.{i}", f"b{i}"))
            sl = endpoint_slice("pay-burst", "pay", *eps)
            if i == 0:
                api.store.create(ENDPOINTSLICES, sl)
            else:
                sl["metadata"]["resourceVersion"] = ""
                api.store.update(ENDPOINTSLICES, sl)
        await until(lambda: len(rec.addresses("pay")) == 30, "all 30 endpoints")
        # 60 writes in well under the debounce interval: one publish, two if a boundary fell
        # inside the burst; never one per write.
        assert len(rec.values) - before <= 2
    finally:
        await rec.aclose()
        source.close()
