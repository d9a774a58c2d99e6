"""The MCS write-back driver: the merged catalog -> ServiceImports and ServiceExport conditions.

`McsWriteBack.run(catalog)` follows a `mesh.interfaces.MergedCatalog` (fedgate/ wires the etcd
one, `federation.merged_feed`) and, after each change, makes the cluster hold what
`clusters.kube.mcs.plan` says: it lists the ServiceImports labelled as fedgate's and the
ServiceExports, and sends the planned server-side applies (field manager `fedgate`, `force`, as
controllers do: a field another manager took over is taken back) and deletions. It is level
triggered: the same sync runs again every `resync` seconds (a condition someone removed, an
export recreated without status, a namespace created after the service merged), and after a
failure with a jittered exponential backoff, always from the newest catalog; a sync of an
unchanged cluster writes nothing. Exports the cluster's source rejected (`rejected`, read on the
event loop before each sync) get `Valid` False; the source `poke()`s the write-back when its
rejections change, so that condition does not wait for the resync.

The `kubernetes` client is synchronous, so each sync runs in a worker thread
(`asyncio.to_thread`); syncs never overlap. A ServiceImport whose namespace does not exist in
this cluster is skipped and logged (namespace sameness: nothing in that namespace could use
it); a ServiceExport deleted between the list and the write is skipped. Any other API error
fails the sync, which is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import kubernetes
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from clusters.kube.cache import Backoff, SyncOutcomes
from clusters.kube.mcs import (
    EXPORTS,
    IMPORTS,
    MANAGED_SELECTOR,
    MANAGER,
    Apply,
    Delete,
    Key,
    Write,
    plan,
)
from mesh.interfaces import MergedCatalog
from mesh.model import MergedService
from mesh.naming import check_label

_log = logging.getLogger("fedgate.clusters.kube")

MCS_GROUP, MCS_VERSION = "multicluster.x-k8s.io", "v1alpha1"
APPLY_PATCH = "application/apply-patch+yaml"
DEFAULT_RESYNC = 30.0
TIMEOUT = (5.0, 30.0)  # connect, read (seconds)
NOT_FOUND = 404


class WriteBackError(Exception):
    """A sync could not complete; it is retried."""


def rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(int(t), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class McsWriteBack:
    def __init__(
        self,
        api_client: Any,
        cluster: str,
        *,
        resync: float = DEFAULT_RESYNC,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
        rejected: Callable[[], Mapping[Key, str]] = dict,
    ) -> None:
        self._api = kubernetes.client.CustomObjectsApi(api_client)
        self.cluster = check_label(cluster, "cluster name")
        self._outcomes = SyncOutcomes(
            resync, backoff or Backoff(initial=1.0, cap=30.0, rng=random.Random())
        )
        self._clock = clock
        self._rejected = rejected  # the exports the source rejected (read on the event loop)
        self._wake = asyncio.Event()
        self.syncs = 0  # metrics and /config
        self.writes = 0
        self.synced: tuple[MergedService, ...] | None = None  # the catalog of the last good sync
        self.skipped: set[str] = set()  # writes skipped (404) at the last sync, logged once

    @property
    def failures(self) -> int:
        return self._outcomes.failures

    @property
    def last_error(self) -> str:
        return self._outcomes.last_error

    def status(self) -> dict[str, object]:
        return {
            "syncs": self.syncs,
            "writes": self.writes,
            "failures": self.failures,
            "lastError": self.last_error,
            "services": None if self.synced is None else len(self.synced),
            "skipped": sorted(self.skipped),
        }

    def poke(self) -> None:
        """Sync now (the source's rejections changed); call on the event loop."""
        self._wake.set()

    async def run(self, catalog: MergedCatalog) -> None:
        latest: list[tuple[MergedService, ...]] = []

        async def follow() -> None:
            async for services in catalog.changes():
                latest[:] = [services]
                self._wake.set()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(follow(), name="mcs-writeback:catalog")
            wait: float | None = None  # nothing to sync before the first catalog
            while True:
                # A timeout: resync, or retry. asyncio.timeout, not wait_for: 3.11's wait_for
                # can swallow a cancellation that lands as the wake-up completes.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                self._wake.clear()
                if not latest:
                    continue  # poked before the first catalog arrived
                try:
                    await asyncio.to_thread(self.sync, latest[0], dict(self._rejected()))
                except WriteBackError as e:
                    wait = self._outcomes.failed(e)
                    _log.warning("mcs write-back failed, retrying in %.1fs: %s", wait, e)
                    continue
                wait = self._outcomes.succeeded()

    def sync(
        self, services: tuple[MergedService, ...], rejected: Mapping[Key, str] | None = None
    ) -> int:
        """Make the cluster hold `services` and the `rejected` exports' conditions (blocking);
        the number of writes sent."""
        try:
            imports = self._list(IMPORTS, MANAGED_SELECTOR)
            exports = self._list(EXPORTS)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            raise WriteBackError(f"list: {_describe(e)}") from e
        now = rfc3339(self._clock())
        writes = plan(self.cluster, services, imports, exports, now, rejected)
        sent = 0
        skipped: set[str] = set()
        for w in writes:
            what = _describe_write(w)
            try:
                self._send(w)
            except ApiException as e:
                if e.status == NOT_FOUND:  # namespace missing, export just deleted, ...
                    skipped.add(what)
                    if what not in self.skipped:  # once, not at every resync
                        _log.warning("mcs write-back skipped %s: %s", what, _describe(e))
                    continue
                raise WriteBackError(f"{what}: {_describe(e)}") from e
            except (urllib3.exceptions.HTTPError, OSError) as e:
                raise WriteBackError(f"{what}: {_describe(e)}") from e
            sent += 1
            _log.info("mcs write-back: %s", what)
        self.skipped = skipped
        self.syncs += 1
        self.writes += sent
        self.synced = services
        self._outcomes.last_error = ""
        return sent

    def _list(self, plural: str, selector: str | None = None) -> list[dict[str, Any]]:
        kw: dict[str, Any] = {"_request_timeout": TIMEOUT}
        if selector:
            kw["label_selector"] = selector
        answer = self._api.list_cluster_custom_object(MCS_GROUP, MCS_VERSION, plural, **kw)
        if not isinstance(answer, dict):
            raise WriteBackError(f"list {plural}: not an object")
        return list(answer.get("items") or [])

    def _send(self, w: Write) -> None:
        match w:
            case Apply(plural, namespace, name, body, subresource):
                call = (
                    self._api.patch_namespaced_custom_object_status
                    if subresource == "status"
                    else self._api.patch_namespaced_custom_object
                )
                # Client 37 returns None when the apply created the object (201): not used.
                call(
                    MCS_GROUP, MCS_VERSION, namespace, plural, name, body,
                    field_manager=MANAGER, force=True, _content_type=APPLY_PATCH,
                    _request_timeout=TIMEOUT,
                )  # fmt: skip
            case Delete(plural, namespace, name):
                self._api.delete_namespaced_custom_object(
                    MCS_GROUP, MCS_VERSION, namespace, plural, name, _request_timeout=TIMEOUT
                )
            case _:
                raise AssertionError(f"unknown write {w!r}")


def _describe_write(w: Write) -> str:
    match w:
        case Apply(plural, namespace, name, _, subresource):
            return f"apply {plural}/{namespace}/{name}" + (f"/{subresource}" if subresource else "")
        case Delete(plural, namespace, name):
            return f"delete {plural}/{namespace}/{name}"
        case _:
            raise AssertionError(f"unknown write {w!r}")


def _describe(e: BaseException) -> str:
    if isinstance(e, ApiException):
        return f"{e.status} {e.reason}"
    return str(e) or type(e).__name__
