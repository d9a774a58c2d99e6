"""The `fedgate-bootstrap` ConfigMaps and the injector webhook's caBundle: planned purely, then
kept by the writer in the faithful fake API server (driven by the unmodified `kubernetes`
client) from a real CA directory that is rotated under it, as the agent wires it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from ca.bootstrap import Bootstrap
from ca.cadir import init_ca_dir, prepare_rotation
from clusters.inject.admission import CONFIGURATION_NAME, WEBHOOK_NAME, webhook_configuration
from clusters.kube.bootstrap import (
    CONFIG_MAP,
    BootstrapData,
    config_map,
    plan,
    webhook_ca,
    webhook_holds,
)
from clusters.kube.bootstrap_writer import BootstrapWriter, _namespace_gone
from clusters.kube.cache import Backoff
from fedgate import kube_bootstrap
from fedgate.check_facts import NEEDS
from fedgate.identity import AgentCA
from tests.clusters.kube_rig import FAST, TD, api, client, until
from tests.kubefake import FakeKubeAPI
from tests.kubefake.resources import CONFIGMAPS, MUTATINGWEBHOOKS, NAMESPACES, Obj
from tests.kubefake.store import StoreError

ROOT_A = "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n"
ROOT_B = "-----BEGIN CERTIFICATE-----\nB\n-----END CERTIFICATE-----\n"
CONTROL = "-----BEGIN CERTIFICATE-----\nC\n-----END CERTIFICATE-----\n"
DATA = BootstrapData((ROOT_A,), CONTROL, TD)
ENABLED = {"fedgate.io/inject": "enabled"}
NOW = "2026-12-06T10:00:00Z"
MANAGED = {"app.kubernetes.io/managed-by": "fedgate"}
__all__ = ["api", "client"]  # fixtures


def namespace(name: str, labels: dict[str, str] | None = None, **extra: Any) -> Obj:
    return {"metadata": {"name": name, "labels": labels or {}}, **extra}


# --- the pure plan ----------------------------------------------------------------------------


def test_only_labelled_live_namespaces_get_the_config_map() -> None:
    namespaces = [
        namespace("shop", ENABLED),
        namespace("plain"),
        namespace("off", {"fedgate.io/inject": "disabled"}),
        namespace("going", ENABLED, status={"phase": "Terminating"}),
        {"metadata": {**namespace("gone", ENABLED)["metadata"], "deletionTimestamp": NOW}},
    ]
    writes = plan(namespaces, [], DATA)
    assert [(w.plural, w.namespace, w.name) for w in writes] == [("configmaps", "shop", CONFIG_MAP)]
    body = writes[0].body
    assert body["data"] == {"ca.pem": ROOT_A, "control.pem": CONTROL, "trust-domain": TD}
    assert body["metadata"]["labels"] == MANAGED


def test_a_config_map_holding_the_data_is_not_rewritten_whatever_else_it_holds() -> None:
    held = config_map("shop", DATA)
    held["data"]["extra"] = "someone else's"
    held["metadata"]["annotations"] = {"note": "kept"}
    assert plan([namespace("shop", ENABLED)], [held], DATA) == ()
    edited = config_map("shop", DATA)
    edited["data"]["ca.pem"] = ROOT_B
    assert len(plan([namespace("shop", ENABLED)], [edited], DATA)) == 1
    rotated = BootstrapData((ROOT_A, ROOT_B), CONTROL, TD)
    (w,) = plan([namespace("shop", ENABLED)], [held], rotated)
    assert w.body["data"]["ca.pem"] == ROOT_A + ROOT_B  # both roots while the rotation runs


def test_the_webhook_apply_carries_only_fedgates_ca_bundle() -> None:
    w = webhook_ca(DATA)
    assert (w.plural, w.namespace, w.name) == (
        "mutatingwebhookconfigurations",
        "",
        CONFIGURATION_NAME,
    )
    assert w.body["webhooks"] == [
        {
            "name": WEBHOOK_NAME,
            "clientConfig": {"caBundle": base64.b64encode(ROOT_A.encode()).decode()},
        }
    ]
    assert not webhook_holds(webhook_configuration(None), DATA)
    assert webhook_holds(webhook_configuration(ROOT_A.encode()), DATA)
    assert not webhook_holds(webhook_configuration(ROOT_B.encode()), DATA)


def test_incomplete_data_is_refused() -> None:
    with pytest.raises(ValueError, match="control root"):
        BootstrapData((ROOT_A,), " ", TD)
    with pytest.raises(ValueError, match="cluster roots"):
        BootstrapData((), CONTROL, TD)


# --- the writer against the fake API server, from a real CA directory --------------------------


class Agent:
    """The agent's part that matters here: its CA directory (followed, as `_agent` does, with
    the writer poked when the published roots change) and the writer."""

    def __init__(self, tmp: Path, client: Any) -> None:
        now = dt.datetime.now(dt.UTC)
        self.ca_dir = tmp / "ca"
        init_ca_dir(self.ca_dir, TD, now)
        control = init_ca_dir(tmp / "control", "control.fedgate.local", now)
        self.control_root = tmp / "control.pem"
        self.control_root.write_bytes(control.root_pem)
        self.ca = AgentCA(self.ca_dir)
        built = kube_bootstrap.writer(client, self.ca, self.control_root)
        assert isinstance(built, BootstrapWriter)
        self.writer = built
        # No periodic resync in these tests: every restoration must come from a watch event
        # or from the rotation's poke.
        self.writer.outcomes.resync = 3600.0
        self.writer.outcomes.backoff = Backoff(initial=0.02, cap=0.1)
        self.writer._settings = FAST

    async def publish(self, roots: tuple[str, ...]) -> None:
        self.writer.poke()


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[None]:
    tasks = [
        asyncio.create_task(agent.writer.run(), name="test:bootstrap"),
        asyncio.create_task(agent.ca.follow(agent.publish, interval=0.05), name="test:ca"),
    ]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


def held(api: FakeKubeAPI, ns: str) -> Obj | None:
    try:
        return api.store.get(CONFIGMAPS, ns, CONFIG_MAP)
    except StoreError:
        return None


def ca_pem(api: FakeKubeAPI, ns: str) -> str | None:
    cm = held(api, ns)
    return None if cm is None else cm.get("data", {}).get("ca.pem")


def ca_bundle(api: FakeKubeAPI) -> str:
    hook = api.store.get(MUTATINGWEBHOOKS, "", CONFIGURATION_NAME)["webhooks"][0]
    return base64.b64decode(hook["clientConfig"].get("caBundle", "")).decode()


def published(agent: Agent) -> str:
    return "".join(agent.ca.published_roots())


async def test_labelled_namespaces_get_the_config_map_and_keep_it(
    api: FakeKubeAPI, client: Any, tmp_path: Path
) -> None:
    s = api.store
    s.create(NAMESPACES, namespace("shop", ENABLED))
    s.create(NAMESPACES, namespace("plain"))
    agent = Agent(tmp_path, client)
    async with running(agent):
        await until(
            lambda: held(api, "shop") is not None, "the ConfigMap in the labelled namespace"
        )
        cm = held(api, "shop")
        assert cm is not None
        # What the sidecar reads: the projected files load as its Bootstrap.
        files = tmp_path / "identity"
        files.mkdir()
        for key, value in cm["data"].items():
            (files / key).write_text(value)
        (files / "token").write_text("t")
        boot = Bootstrap.load(files)
        assert boot.trust_domain == TD
        assert boot.cluster_root_pem.decode() == published(agent)
        assert boot.control_root_pem == agent.control_root.read_bytes()
        assert cm["metadata"]["labels"] == MANAGED
        assert [m["manager"] for m in cm["metadata"]["managedFields"]] == ["fedgate"]

        # A namespace labelled later gets it (a watch event; the resync is an hour away).
        ns = s.get(NAMESPACES, "", "plain")
        ns["metadata"]["labels"].update(ENABLED)
        s.update(NAMESPACES, ns)
        await until(lambda: held(api, "plain") is not None, "the namespace labelled later")

        # A deleted ConfigMap comes back; an edited one is set back.
        s.delete(CONFIGMAPS, "shop", CONFIG_MAP)
        await until(lambda: held(api, "shop") is not None, "the deleted ConfigMap restored")
        edited = s.get(CONFIGMAPS, "plain", CONFIG_MAP)
        edited["data"]["ca.pem"] = "tampered"
        s.update(CONFIGMAPS, edited)
        await until(lambda: ca_pem(api, "plain") == published(agent), "the edit undone")

        # A namespace that loses the label keeps its ConfigMap (pods there still mount it); a
        # namespace never labelled never gets one.
        s.create(NAMESPACES, namespace("other"))
        ns = s.get(NAMESPACES, "", "plain")
        del ns["metadata"]["labels"]["fedgate.io/inject"]
        s.update(NAMESPACES, ns)
        s.create(NAMESPACES, namespace("late", ENABLED))
        await until(lambda: held(api, "late") is not None, "a later labelled namespace")
        assert held(api, "plain") is not None
        assert held(api, "other") is None
    assert agent.writer.outcomes.failures == 0


async def test_another_managers_fields_on_the_config_map_are_left_alone(
    api: FakeKubeAPI, client: Any, tmp_path: Path
) -> None:
    s = api.store
    s.create(NAMESPACES, namespace("shop", ENABLED))
    # Someone applied the ConfigMap first, with a key of their own, an annotation, and a
    # (stale) ca.pem.
    theirs = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CONFIG_MAP, "namespace": "shop", "annotations": {"team": "pay"}},
        "data": {"ca.pem": "stale", "notes.txt": "ours"},
    }
    s.apply(CONFIGMAPS, "shop", CONFIG_MAP, theirs, "kubectl")
    agent = Agent(tmp_path, client)
    async with running(agent):
        await until(lambda: ca_pem(api, "shop") == published(agent), "fedgate's data applied")
    cm = held(api, "shop")
    assert cm is not None
    assert cm["data"]["notes.txt"] == "ours"
    assert cm["metadata"]["annotations"] == {"team": "pay"}
    owners = {m["manager"]: m["fieldsV1"] for m in cm["metadata"]["managedFields"]}
    assert "f:ca.pem" in owners["fedgate"]["f:data"]  # taken over (force), as a controller does
    assert set(owners["kubectl"]["f:data"]) == {"f:notes.txt"}


async def test_a_root_rotation_rewrites_the_config_maps_and_the_webhook_ca_bundle(
    api: FakeKubeAPI, client: Any, tmp_path: Path
) -> None:
    s = api.store
    s.create(NAMESPACES, namespace("shop", ENABLED))
    s.create(NAMESPACES, namespace("cart", ENABLED))
    # Installed without a caBundle (or with the install-time one): the agent fills it in.
    s.create(MUTATINGWEBHOOKS, webhook_configuration(None))
    agent = Agent(tmp_path, client)
    before = published(agent)
    async with running(agent):
        await until(
            lambda: (
                ca_pem(api, "shop") == ca_pem(api, "cart") == before and ca_bundle(api) == before
            ),
            "the ConfigMaps and the caBundle at start",
        )
        prepare_rotation(agent.ca_dir, dt.datetime.now(dt.UTC))
        await until(lambda: published(agent) != before, "the CA directory reloaded")
        after = published(agent)
        assert after.startswith(before)  # the old root, then the new one
        await until(
            lambda: ca_pem(api, "shop") == ca_pem(api, "cart") == after and ca_bundle(api) == after,
            "the rotation written",
        )
    hook = s.get(MUTATINGWEBHOOKS, "", CONFIGURATION_NAME)
    # Only the caBundle changed: the rest of the installed configuration is as it was.
    assert hook["webhooks"][0]["clientConfig"]["service"]["name"] == "fedgate-agent"
    assert hook["webhooks"][0]["failurePolicy"] == "Ignore"
    (entry,) = [m for m in hook["metadata"]["managedFields"] if m["manager"] == "fedgate"]
    key = json.dumps({"name": WEBHOOK_NAME}, separators=(",", ":"))
    assert entry["fieldsV1"] == {
        "f:webhooks": {f"k:{key}": {".": {}, "f:clientConfig": {"f:caBundle": {}}, "f:name": {}}}
    }
    assert agent.writer.status()["webhookCaBundle"] == "current"


async def test_a_missing_webhook_configuration_is_reported_not_created(
    api: FakeKubeAPI, client: Any, tmp_path: Path
) -> None:
    api.store.create(NAMESPACES, namespace("shop", ENABLED))
    agent = Agent(tmp_path, client)
    async with running(agent):
        await until(lambda: held(api, "shop") is not None, "the ConfigMap")
        await until(
            lambda: str(agent.writer.status()["webhookCaBundle"]).startswith("not installed"),
            "the missing configuration reported",
        )
    with pytest.raises(StoreError):
        api.store.get(MUTATINGWEBHOOKS, "", CONFIGURATION_NAME)
    assert agent.writer.outcomes.failures == 0


def test_without_a_control_root_nothing_is_written(tmp_path: Path) -> None:
    init_ca_dir(tmp_path / "ca", TD, dt.datetime.now(dt.UTC))
    assert kube_bootstrap.writer(object(), AgentCA(tmp_path / "ca"), None) is None


def test_fedgate_check_asks_for_the_named_webhook_configuration() -> None:
    # check_facts keeps its own copy of the name (it imports nothing of clusters/).
    named = {n.name for n in NEEDS if n.resource == "mutatingwebhookconfigurations"}
    assert named == {CONFIGURATION_NAME}


def test_an_unreadable_control_root_stops_the_agent_at_start(tmp_path: Path) -> None:
    init_ca_dir(tmp_path / "ca", TD, dt.datetime.now(dt.UTC))
    (tmp_path / "empty.pem").write_text("")
    for path in (tmp_path / "missing.pem", tmp_path / "empty.pem"):
        with pytest.raises(SystemExit, match="--control-root"):
            kube_bootstrap.writer(object(), AgentCA(tmp_path / "ca"), path)


def test_only_a_vanished_namespace_is_skipped_a_denied_write_fails() -> None:
    def refused(status: int, message: str) -> ApiException:
        e = ApiException(status=status, reason="x")
        e.body = json.dumps({"kind": "Status", "code": status, "message": message})
        return e

    terminating = 'configmaps "fedgate-bootstrap" is forbidden: unable to create new content in '
    terminating += "namespace shop because it is being terminated"
    assert _namespace_gone(refused(404, 'namespaces "shop" not found'))
    assert _namespace_gone(refused(403, terminating))
    denied = 'configmaps "fedgate-bootstrap" is forbidden: User "system:serviceaccount:..." cannot'
    assert not _namespace_gone(refused(403, denied + ' patch resource "configmaps"'))
