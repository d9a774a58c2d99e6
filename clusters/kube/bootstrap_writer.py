"""The bootstrap driver: keeps `fedgate-bootstrap` in every injected namespace and the injector
webhook's `caBundle` current (what to write: `clusters.kube.bootstrap`).

Two informers (`clusters.kube.informer`, threads) follow the Namespaces labelled
`fedgate.io/inject=enabled` (a label selector) and the ConfigMaps named `fedgate-bootstrap` in
every namespace (a field selector, `metadata.name`), so a namespace labelled later, and a
ConfigMap deleted or edited, are seen at once; the writer also resyncs every `resync` seconds
and when the agent `poke()`s it because the published roots changed (a root rotation). Each sync
plans from the informers' caches and sends the applies in a worker thread (the client is
synchronous); syncs never overlap. A namespace deleted between the event and the write (404,
or the 403 "being terminated") is skipped; any other error fails the sync, which is retried
after a jittered backoff.

The webhook configuration is not watched (RBAC can then name it: `get`, `patch` on
`resourceNames: [fedgate-sidecar-injector]`; list and watch cannot be restricted by name): each
sync reads it and applies the caBundle when it differs. One that is not installed (404, or the
422 a real server answers when the apply would create it) is reported in `status()`, not
retried faster than the resync.

Every replica of the agent runs this (the agent has no leader election); they apply the same
content as the same field manager, so they agree, and a server-side apply that changes nothing
is not a write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import Callable
from typing import Any

import kubernetes
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from clusters.kube.bootstrap import (
    CONFIG_MAP_SELECTOR,
    NAMESPACE_SELECTOR,
    BootstrapData,
    plan,
    webhook_ca,
    webhook_holds,
)
from clusters.kube.cache import Backoff, SyncOutcomes
from clusters.kube.informer import Informer, InformerSettings, ListWatch
from clusters.kube.mcs import MANAGER, Apply

_log = logging.getLogger("fedgate.clusters.kube")

APPLY_PATCH = "application/apply-patch+yaml"
TIMEOUT = (5.0, 30.0)  # connect, read (seconds)
DEFAULT_RESYNC = 60.0
NOT_FOUND, FORBIDDEN = 404, 403
NOT_INSTALLED = (404, 422)


def _namespace_gone(e: ApiException) -> bool:
    """The namespace went away under the write: 404, or the 403 the API server answers for a
    namespace being terminated (any other 403 is missing RBAC, which must fail the sync)."""
    body = str(e.body or "")
    return e.status == NOT_FOUND or (e.status == FORBIDDEN and "being terminated" in body)


class BootstrapError(Exception):
    """A sync could not complete; it is retried."""


def _describe(e: BaseException) -> str:
    if isinstance(e, ApiException):
        return f"{e.status} {e.reason}"
    return str(e) or type(e).__name__


class BootstrapWriter:
    def __init__(
        self,
        api_client: Any,
        data: Callable[[], BootstrapData],
        *,
        settings: InformerSettings | None = None,
        resync: float = DEFAULT_RESYNC,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._api_client = api_client
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._admission = kubernetes.client.AdmissionregistrationV1Api(api_client)
        self._data = data  # read on the event loop before each sync
        self._settings = settings or InformerSettings()
        self._rng = rng or random.Random()
        self.outcomes = SyncOutcomes(resync, backoff or Backoff(1.0, 30.0, rng=self._rng))
        self._wake = asyncio.Event()
        self._lock = threading.Lock()
        self._informers: tuple[Informer, ...] = ()
        self.syncs = 0  # /config
        self.writes = 0
        self.webhook = "unknown"  # "current", "not installed: ...", or "unknown"

    def status(self) -> dict[str, object]:
        return {
            "syncs": self.syncs,
            "writes": self.writes,
            "failures": self.outcomes.failures,
            "lastError": self.outcomes.last_error,
            "webhookCaBundle": self.webhook,
            "informers": [i.stats() for i in self._informers],
        }

    def poke(self) -> None:
        """Sync now (the published roots changed); call on the event loop."""
        self._wake.set()

    def _list_watches(self) -> tuple[ListWatch, ListWatch]:
        return (
            ListWatch("Namespace", self._core.list_namespace, NAMESPACE_SELECTOR),
            ListWatch(
                "ConfigMap",
                self._core.list_config_map_for_all_namespaces,
                field_selector=CONFIG_MAP_SELECTOR,
            ),
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()

        def notify() -> None:  # from informer threads
            with contextlib.suppress(RuntimeError):  # the loop closed under a stopping thread
                loop.call_soon_threadsafe(self._wake.set)

        informers = tuple(
            Informer(lw, self._lock, notify, self._settings, random.Random(self._rng.random()))
            for lw in self._list_watches()
        )
        self._informers = informers
        for i in informers:
            i.start()
        try:
            wait: float | None = None  # until the informers have listed
            while True:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                # that lands as the wake-up completes, and the task would then never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                self._wake.clear()
                with self._lock:
                    if not all(i.cache.synced for i in informers):
                        continue
                    namespaces, maps = (list(i.cache.objects.values()) for i in informers)
                try:
                    data = self._data()
                    await asyncio.to_thread(self.sync, namespaces, maps, data)
                except (BootstrapError, ValueError, OSError) as e:
                    wait = self.outcomes.failed(e)
                    _log.warning("bootstrap sync failed, retrying in %.1fs: %s", wait, e)
                    continue
                wait = self.outcomes.succeeded()
        finally:
            await asyncio.to_thread(_stop_all, informers)

    def sync(self, namespaces: list[Any], config_maps: list[Any], data: BootstrapData) -> int:
        """Write what `plan` says and the webhook's caBundle (blocking); the writes sent."""
        sent = 0
        for w in plan(namespaces, config_maps, data):
            try:
                self._core.patch_namespaced_config_map(
                    w.name, w.namespace, w.body, **self._apply_options()
                )
            except ApiException as e:
                if _namespace_gone(e):
                    _log.info("bootstrap: skipped %s: %s", w.namespace, _describe(e))
                    continue
                raise BootstrapError(
                    f"apply configmap {w.namespace}/{w.name}: {_describe(e)}"
                ) from e
            except (urllib3.exceptions.HTTPError, OSError) as e:
                raise BootstrapError(
                    f"apply configmap {w.namespace}/{w.name}: {_describe(e)}"
                ) from e
            sent += 1
            _log.info("bootstrap: wrote %s/%s", w.namespace, w.name)
        sent += self._sync_webhook(webhook_ca(data), data)
        self.syncs += 1
        self.writes += sent
        self.outcomes.last_error = ""
        return sent

    def _sync_webhook(self, w: Apply, data: BootstrapData) -> int:
        try:
            held = self._admission.read_mutating_webhook_configuration(
                w.name, _request_timeout=TIMEOUT
            )
            if webhook_holds(self._api_client.sanitize_for_serialization(held), data):
                self.webhook = "current"
                return 0
            self._admission.patch_mutating_webhook_configuration(
                w.name, w.body, **self._apply_options()
            )
        except ApiException as e:
            if e.status in NOT_INSTALLED:
                if not self.webhook.startswith("not installed"):  # once, not every resync
                    _log.warning("bootstrap: webhook configuration %s not installed", w.name)
                self.webhook = f"not installed: {_describe(e)}"
                return 0
            raise BootstrapError(f"webhook configuration {w.name}: {_describe(e)}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise BootstrapError(f"webhook configuration {w.name}: {_describe(e)}") from e
        self.webhook = "current"
        _log.info("bootstrap: webhook %s caBundle updated", w.name)
        return 1

    @staticmethod
    def _apply_options() -> dict[str, Any]:
        # Client 37 returns None when the apply created the object (201): not used.
        return {
            "field_manager": MANAGER,
            "force": True,
            "_content_type": APPLY_PATCH,
            "_request_timeout": TIMEOUT,
        }


def _stop_all(informers: tuple[Informer, ...]) -> None:
    for i in informers:
        i.stop(timeout=0)  # shut every socket down first, then wait for the threads
    for i in informers:
        i.stop()
