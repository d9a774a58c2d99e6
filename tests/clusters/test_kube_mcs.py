"""MCS write-back: ServiceImports and ServiceExport conditions, planned purely, then written by
server-side apply into the faithful fake API server and asserted on its stored objects; last,
the agent's whole path from the leader's status records in a real etcd."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from etcd3aio import Etcd3Client

from clusters.kube.cache import Backoff
from clusters.kube.mcs import (
    Apply,
    Delete,
    export_status,
    plan,
    rejected_exports,
    service_import,
)
from clusters.kube.source import KubeClusterSource
from clusters.kube.translate import Rejection
from clusters.kube.writeback import McsWriteBack, WriteBackError
from federation import keys
from federation.merge import merge_service
from federation.merged_feed import EtcdMergedCatalog
from federation.status import service_entry
from federation.store import kv_service
from fedgate.processes import SourceSettings, source_identity_and_writeback
from mesh.interfaces import MergedCatalog
from mesh.model import Condition, MergedService, ServiceExport, ServicePort
from mesh.naming import ServiceKey
from tests.clusters.kube_objects import NS, service_export
from tests.clusters.kube_rig import (
    FAST,
    TD,
    Recorder,
    api,
    api_client,
    client,
    until,
    write_kubeconfig,
)
from tests.etcd_fixture import etcd, etcd_server
from tests.kubefake import FakeKubeAPI
from tests.kubefake.resources import SERVICEEXPORTS, SERVICEIMPORTS
from tests.kubefake.store import StoreError

# fixtures: the session's etcd and a client, the fake API server and a client for it
__all__ = ["api", "client", "etcd", "etcd_server"]

MANAGED = {"app.kubernetes.io/managed-by": "fedgate"}
NOW, LATER = "2026-12-06T10:00:00Z", "2026-12-06T11:00:00Z"
CONFLICT = Condition(
    "Conflict",
    True,
    "PortConflict",
    "exports in clusters east, west conflict, the oldest export wins: port 'http': ...",
)
VALID = Condition("Valid", True, "Merged", "")
PORTS = (ServicePort("http", 8080, "HTTP"), ServicePort("grpc", 9090, "GRPC"))


def merged(
    name: str,
    *conditions: Condition,
    vip: str = "10.255.0.7",
    clusters: tuple[str, ...] = ("east", "west"),
    ports: tuple[ServicePort, ...] = PORTS,
) -> MergedService:
    return MergedService(ServiceKey(NS, name), vip, ports, clusters, (), conditions or (VALID,))


def conditions(obj: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {
        c["type"]: (c["status"], c["reason"], c["lastTransitionTime"])
        for c in obj.get("status", {}).get("conditions", [])
    }


def managers(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        m["manager"] + ("/" + m["subresource"] if "subresource" in m else ""): m["fieldsV1"]
        for m in obj["metadata"]["managedFields"]
    }


# --- the pure plan ----------------------------------------------------------------------------


def test_a_service_import_carries_type_vip_and_the_merged_ports() -> None:
    ports = (*PORTS, ServicePort("", 5432, "TCP"), ServicePort("h2", 8443, "HTTP2"))
    assert service_import(merged("pay", ports=ports)) == {
        "apiVersion": "multicluster.x-k8s.io/v1alpha1",
        "kind": "ServiceImport",
        "metadata": {"name": "pay", "namespace": NS, "labels": MANAGED},
        "spec": {
            "type": "ClusterSetIP",
            "ips": ["10.255.0.7"],
            "ports": [
                {"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"},
                {"name": "grpc", "port": 9090, "protocol": "TCP", "appProtocol": "grpc"},
                {"port": 5432, "protocol": "TCP"},
                {"name": "h2", "port": 8443, "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"},
            ],
        },
    }
    assert "ips" not in service_import(merged("pay", vip=""))["spec"]  # no VIP allocated yet


def test_exports_get_valid_and_conflict_from_the_controllers_condition() -> None:
    export = service_export("pay")
    valid = export_status(export, merged("pay", VALID), NOW)["status"]["conditions"]
    assert [(c["type"], c["status"], c["reason"]) for c in valid] == [
        ("Valid", "True", "Merged"),
        ("Conflict", "False", "NoConflict"),
    ]
    clash = export_status(export, merged("pay", CONFLICT), NOW)["status"]["conditions"]
    assert [(c["type"], c["status"], c["reason"], c["message"]) for c in clash] == [
        ("Valid", "True", "Merged", ""),
        ("Conflict", "True", "PortConflict", CONFLICT.message),
    ]


def test_the_plan_writes_only_what_changes_and_keeps_transition_times() -> None:
    pay = merged("pay", CONFLICT)
    first = plan("east", [pay], [], [service_export("pay")], NOW)
    assert [(type(w).__name__, w.plural, w.subresource) for w in first] == [
        ("Apply", "serviceimports", ""),
        ("Apply", "serviceimports", "status"),
        ("Apply", "serviceexports", "status"),
    ]
    spec, backing, status = (w.body for w in first if isinstance(w, Apply))
    assert backing["status"] == {"clusters": [{"cluster": "east"}, {"cluster": "west"}]}
    held = spec | {"status": backing["status"]}
    export = service_export("pay") | {"status": status["status"]}
    assert plan("east", [pay], [held], [export], LATER) == ()  # held: nothing to write
    (resolved,) = plan("east", [merged("pay", VALID)], [held], [export], LATER)
    assert isinstance(resolved, Apply)
    assert conditions(resolved.body) == {
        "Valid": ("True", "Merged", NOW),  # unchanged status: the transition time stays
        "Conflict": ("False", "NoConflict", LATER),
    }


def test_the_plan_deletes_only_fedgates_stale_imports_and_skips_foreign_exports() -> None:
    ours = service_import(merged("gone"))
    theirs = {"metadata": {"name": "theirs", "namespace": NS}, "spec": {"type": "Headless"}}
    west_only = merged("cart", clusters=("west",))
    writes = plan(
        "east",
        [west_only],
        [ours, theirs],
        [service_export("cart"), service_export("unmerged")],
        NOW,
    )
    # cart is imported here, but its export in east is not part of the merge: no conditions.
    assert [(type(w).__name__, w.plural, w.name) for w in writes] == [
        ("Apply", "serviceimports", "cart"),
        ("Apply", "serviceimports", "cart"),  # its status: backed by west
        ("Delete", "serviceimports", "gone"),
    ]
    assert isinstance(writes[2], Delete)


# --- the driver against the fake API server ---------------------------------------------------


def test_write_back_stores_imports_and_conditions_leaving_other_managers_fields(
    api: FakeKubeAPI, client: Any
) -> None:
    s = api.store
    s.create(SERVICEEXPORTS, service_export("pay"))
    # Another MCS controller's condition on the export, set before fedgate writes.
    other = {
        "type": "Ready",
        "status": "True",
        "reason": "R",
        "message": "",
        "lastTransitionTime": NOW,
    }
    s.apply(
        SERVICEEXPORTS,
        NS,
        "pay",
        {"status": {"conditions": [other]}},
        "other-mcs",
        subresource="status",
    )
    s.create(SERVICEIMPORTS, service_import(merged("gone")))  # fedgate's, service left
    s.create(
        SERVICEIMPORTS,
        {"metadata": {"name": "theirs", "namespace": NS}, "spec": {"type": "Headless"}},
    )
    clock = [1_765_015_200.0]  # 2025-12-06T10:00:00Z
    writer = McsWriteBack(client, "east", clock=lambda: clock[0])

    assert writer.sync((merged("pay", CONFLICT), merged("cart", clusters=("west",)))) == 6

    pay = s.get(SERVICEIMPORTS, NS, "pay")
    assert pay["spec"] == service_import(merged("pay"))["spec"]
    assert pay["metadata"]["labels"] == MANAGED
    assert pay["status"] == {"clusters": [{"cluster": "east"}, {"cluster": "west"}]}
    assert managers(pay) == {
        "fedgate": {
            "f:metadata": {"f:labels": {"f:app.kubernetes.io/managed-by": {}}},
            "f:spec": {"f:ips": {}, "f:ports": {}, "f:type": {}},
        },
        "fedgate/status": {"f:status": {"f:clusters": {}}},
    }
    cart = s.get(SERVICEIMPORTS, NS, "cart")
    assert cart["spec"]["ports"][0]["name"] == "http"
    assert cart["status"] == {"clusters": [{"cluster": "west"}]}
    with pytest.raises(StoreError):
        s.get(SERVICEIMPORTS, NS, "gone")  # the stale import fedgate labelled is deleted
    assert s.get(SERVICEIMPORTS, NS, "theirs")["spec"] == {"type": "Headless"}  # not ours
    export = s.get(SERVICEEXPORTS, NS, "pay")
    stamp = "2025-12-06T10:00:00Z"
    assert conditions(export) == {
        "Ready": ("True", "R", NOW),  # the other manager's condition is left alone
        "Valid": ("True", "Merged", stamp),
        "Conflict": ("True", "PortConflict", stamp),
    }
    fields = managers(export)
    assert set(fields["fedgate/status"]["f:status"]["f:conditions"]) == {
        'k:{"type":"Valid"}',
        'k:{"type":"Conflict"}',
    }
    assert set(fields["other-mcs/status"]["f:status"]["f:conditions"]) == {'k:{"type":"Ready"}'}

    # kubectl labels the import; fedgate's next sync of the same catalog writes nothing.
    s.apply(SERVICEIMPORTS, NS, "pay", {"metadata": {"labels": {"team": "pay"}}}, "kubectl")
    assert writer.sync((merged("pay", CONFLICT), merged("cart", clusters=("west",)))) == 0
    clock[0] += 3600
    assert writer.sync((merged("pay", VALID, vip="10.255.0.9"),)) == 3  # pay, its export, cart
    pay = s.get(SERVICEIMPORTS, NS, "pay")
    assert pay["spec"]["ips"] == ["10.255.0.9"]
    assert pay["metadata"]["labels"] == MANAGED | {"team": "pay"}
    assert conditions(s.get(SERVICEEXPORTS, NS, "pay")) == {
        "Ready": ("True", "R", NOW),
        "Valid": ("True", "Merged", stamp),  # still true: the transition time stays
        "Conflict": ("False", "NoConflict", "2025-12-06T11:00:00Z"),
    }
    with pytest.raises(StoreError):
        s.get(SERVICEIMPORTS, NS, "cart")


class MemoryCatalog:
    """`mesh.interfaces.MergedCatalog` fed by the test."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[MergedService, ...]] = asyncio.Queue(maxsize=8)

    async def changes(self) -> AsyncIterator[tuple[MergedService, ...]]:
        while True:
            yield await self.queue.get()


@contextlib.asynccontextmanager
async def running(writer: McsWriteBack, catalog: MergedCatalog) -> AsyncIterator[None]:
    task = asyncio.create_task(writer.run(catalog), name="test:mcs-writeback")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def imported(api: FakeKubeAPI, name: str) -> bool:
    try:
        api.store.get(SERVICEIMPORTS, NS, name)
    except StoreError:
        return False
    return True


async def test_the_driver_follows_the_catalog_resyncs_and_retries(
    api: FakeKubeAPI, client: Any
) -> None:
    catalog = MemoryCatalog()
    fast = Backoff(initial=0.02, cap=0.1)
    writer = McsWriteBack(client, "east", resync=0.1, backoff=fast)
    async with running(writer, catalog):
        await catalog.queue.put((merged("pay"),))
        await until(lambda: imported(api, "pay"), "the import written")
        api.store.delete(SERVICEIMPORTS, NS, "pay")  # someone deletes it: the resync restores it
        # Restored with its status: stopping the API before the status apply would fail that
        # apply, not the list the assertion below expects.
        await until(
            lambda: (
                imported(api, "pay")
                and bool(api.store.get(SERVICEIMPORTS, NS, "pay").get("status"))
            ),
            "the import restored by the resync",
        )
        api.stop()  # the API server goes away: syncs fail and are retried
        await catalog.queue.put((merged("cart"),))
        await until(lambda: writer.failures > 0, "a failed sync")
        assert writer.last_error.startswith("list: ")
        api.start()
        await until(
            lambda: imported(api, "cart") and not imported(api, "pay") and not writer.last_error,
            "the retry",
        )


def test_a_sync_against_an_unreachable_api_fails_with_a_reason(tmp_path: Path) -> None:
    with (
        api_client(tmp_path, "http://127.0.0.1:1") as c,
        pytest.raises(WriteBackError, match="list: "),
    ):
        McsWriteBack(c, "east").sync((merged("pay"),))


# --- the agent's whole path: the leader's status records in etcd -> the fake API server -------


@pytest.mark.etcd
async def test_the_agent_writes_back_what_the_leader_recorded(
    api: FakeKubeAPI, client: Any, etcd: Etcd3Client
) -> None:
    api.store.create(SERVICEEXPORTS, service_export("pay"))
    key = ServiceKey(NS, "pay")
    exports = [
        ServiceExport("east", key, (ServicePort("http", 8080, "HTTP"),), 1.0),
        ServiceExport("west", key, (ServicePort("http", 9090, "HTTP"),), 2.0),
    ]
    kv = kv_service(etcd)
    await kv.put(*service_entry(merge_service(key, exports, "10.255.0.7"), exports))
    writer = McsWriteBack(client, "east")
    async with running(writer, EtcdMergedCatalog(etcd)):
        await until(lambda: imported(api, "pay"), "the ServiceImport")
        pay = api.store.get(SERVICEIMPORTS, NS, "pay")
        assert pay["spec"] == {
            "type": "ClusterSetIP",
            "ips": ["10.255.0.7"],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
        }
        await until(
            lambda: "Conflict" in conditions(api.store.get(SERVICEEXPORTS, NS, "pay")),
            "the export's conditions",
        )
        conflict = next(
            c
            for c in api.store.get(SERVICEEXPORTS, NS, "pay")["status"]["conditions"]
            if c["type"] == "Conflict"
        )
        assert (conflict["status"], conflict["reason"]) == ("True", "PortConflict")
        assert "clusters east, west" in conflict["message"]
        await kv.delete(keys.service_status_key(key))  # the service left the merged catalog
        await until(lambda: not imported(api, "pay"), "the stale ServiceImport deleted")


def test_a_write_the_api_answers_not_found_is_skipped_and_logged_once(
    api: FakeKubeAPI, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    writer = McsWriteBack(client, "east")
    listed = writer._list

    def with_a_phantom(plural: str, selector: str | None = None) -> list[dict[str, Any]]:
        # An export listed, then deleted before its status is written (a real race).
        phantom = [service_export("pay")] if plural == "serviceexports" else []
        return listed(plural, selector) + phantom

    writer._list = with_a_phantom  # type: ignore[method-assign]
    assert writer.sync((merged("pay"),)) == 2  # the import and its status; not the export
    assert writer.sync((merged("pay"),)) == 0  # the next sync tries the export again, quietly
    assert writer.skipped == {"apply serviceexports/shop/pay/status"}
    skips = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert [r.getMessage() for r in skips] == [
        "mcs write-back skipped apply serviceexports/shop/pay/status: 404 Not Found"
    ]


# --- exports the source rejected --------------------------------------------------------------


def test_an_export_the_source_rejected_is_not_valid_with_the_reason() -> None:
    reasons = rejected_exports(
        [
            Rejection("ServiceExport", NS, "lonely", "no Service shop/lonely to export"),
            Rejection("Service", NS, "pay", "port 1: protocol UDP cannot be federated"),
        ]
    )
    assert reasons == {(NS, "lonely"): "no Service shop/lonely to export"}
    exports = [service_export("lonely"), service_export("pay")]
    reasons[(NS, "pay")] = "stale: the merge says otherwise"
    writes = plan("east", [merged("pay")], [], exports, NOW, reasons)
    statuses = {w.name: w.body for w in writes if w.plural == "serviceexports"}
    assert statuses["lonely"]["status"]["conditions"] == [
        {
            "type": "Valid",
            "status": "False",
            "reason": "Rejected",
            "message": "no Service shop/lonely to export",
            "lastTransitionTime": NOW,
        }
    ]
    assert conditions(statuses["pay"])["Valid"][:2] == ("True", "Merged")  # merged wins


async def test_a_rejected_export_gets_its_condition_without_waiting_for_a_resync(
    api: FakeKubeAPI, tmp_path: Path
) -> None:
    api.store.create(SERVICEEXPORTS, service_export("lonely"))  # no Service to export
    config = write_kubeconfig(tmp_path / "kubeconfig", api.url)
    source = KubeClusterSource.from_kubeconfig(config, "east", TD, settings=FAST, debounce=0.05)
    settings = SourceSettings("kubernetes", config)
    _, writeback = source_identity_and_writeback(settings, source, Path(), "east")
    assert writeback is not None  # wired as the agent wires it: the source pokes it
    catalog = MemoryCatalog()
    await catalog.queue.put(())
    try:
        async with running(writeback, catalog):
            await until(lambda: writeback.syncs == 1, "the first sync, before the source runs")
            recorder = Recorder(source)  # the source finds the export has no Service
            try:
                await until(  # well before the 30 s resync: the source's poke
                    lambda: "Valid" in conditions(api.store.get(SERVICEEXPORTS, NS, "lonely")),
                    "the rejected export's condition",
                )
            finally:
                await recorder.aclose()
        (valid,) = api.store.get(SERVICEEXPORTS, NS, "lonely")["status"]["conditions"]
        assert (valid["status"], valid["reason"], valid["message"]) == (
            "False",
            "Rejected",
            "no Service shop/lonely to export",
        )
    finally:
        source.close()
