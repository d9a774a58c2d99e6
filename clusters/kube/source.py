"""`KubeClusterSource`: `mesh.interfaces.ClusterSource` over a Kubernetes API server.

It runs four informers (informer.py; one thread each, the threading model is argued there):
ServiceExports (`multicluster.x-k8s.io/v1alpha1`, all namespaces), Services, EndpointSlices
carrying the `kubernetes.io/service-name` label, and Pods. `changes()` waits until every
informer has listed once (client-go's WaitForCacheSync), yields the translated exports
(translate.py), and then yields again whenever they change, debounced: the first change after
a quiet spell is published `debounce` seconds later together with everything that arrived in
between, so a rollout touching a hundred pods is one publish, and no publish is later than
`debounce` after its cause. Equal consecutive values are never yielded twice. Every rejected
object is logged once (kind, namespace, name, reason) when it first appears, not on every
publish.

This module writes nothing back (ServiceImports and ServiceExport conditions are
`writeback`'s job, on the same API client) and reads no kubeconfig unless `from_kubeconfig` is
called.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import threading
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import kubernetes

from clusters.kube.informer import Informer, InformerSettings, ListWatch
from clusters.kube.translate import (
    SERVICE_NAME_LABEL,
    ClusterObjects,
    Rejection,
    translate,
)
from mesh.model import ServiceExport
from mesh.naming import SpiffeId, check_label

_log = logging.getLogger("fedgate.clusters.kube")

MCS_GROUP, MCS_VERSION = "multicluster.x-k8s.io", "v1alpha1"
DEFAULT_DEBOUNCE = 0.2


def list_watches(api_client: Any) -> tuple[ListWatch, ListWatch, ListWatch, ListWatch]:
    """The four resources the source watches, as generated client calls (all namespaces)."""
    core = kubernetes.client.CoreV1Api(api_client)
    discovery = kubernetes.client.DiscoveryV1Api(api_client)
    custom = kubernetes.client.CustomObjectsApi(api_client)
    exports = functools.partial(
        custom.list_cluster_custom_object, MCS_GROUP, MCS_VERSION, "serviceexports"
    )
    return (
        ListWatch("ServiceExport", exports),
        ListWatch("Service", core.list_service_for_all_namespaces),
        # Only slices a Service owns carry the label (an existence selector: one watch for all).
        ListWatch(
            "EndpointSlice", discovery.list_endpoint_slice_for_all_namespaces, SERVICE_NAME_LABEL
        ),
        ListWatch("Pod", core.list_pod_for_all_namespaces),
    )


class KubeClusterSource:
    def __init__(
        self,
        api_client: Any,
        cluster: str,
        trust_domain: str,
        *,
        settings: InformerSettings | None = None,
        debounce: float = DEFAULT_DEBOUNCE,
        rng: random.Random | None = None,
    ) -> None:
        SpiffeId(trust_domain, "default", "default")  # fail now if the trust domain is malformed
        self._api_client = api_client
        self._owns_client = False
        self._cluster = check_label(cluster, "cluster name")
        self._trust_domain = trust_domain
        self._settings = settings or InformerSettings()
        self._debounce = debounce
        self._rng = rng or random.Random()
        self._informers: tuple[Informer, ...] = ()
        self.rejections: tuple[Rejection, ...] = ()
        self.on_rejections: Callable[[], None] = lambda: None  # called when they change
        self.publishes = 0

    @classmethod
    def from_kubeconfig(
        cls, path: Path, cluster: str, trust_domain: str, context: str | None = None, **kw: Any
    ) -> KubeClusterSource:
        client = kubernetes.config.new_client_from_config(config_file=str(path), context=context)
        source = cls(client, cluster, trust_domain, **kw)
        source._owns_client = True
        return source

    @classmethod
    def in_cluster(cls, cluster: str, trust_domain: str, **kw: Any) -> KubeClusterSource:
        """A source using the pod's ServiceAccount (the agent deployed in the cluster)."""
        config = kubernetes.client.Configuration()
        kubernetes.config.load_incluster_config(client_configuration=config)
        source = cls(kubernetes.client.ApiClient(config), cluster, trust_domain, **kw)
        source._owns_client = True
        return source

    @property
    def api_client(self) -> Any:
        """The `kubernetes` ApiClient (shared with the MCS write-back and the TokenReview
        authenticator, which fedgate/ wires next to the source)."""
        return self._api_client

    def close(self) -> None:
        """Close the API client if this source created it (call after `changes()` ended)."""
        if self._owns_client:
            self._api_client.close()

    def stats(self) -> list[dict[str, object]]:
        return [i.stats() for i in self._informers]

    async def changes(self) -> AsyncGenerator[tuple[ServiceExport, ...], None]:
        loop = asyncio.get_running_loop()
        dirty = asyncio.Event()
        lock = threading.Lock()

        def notify() -> None:  # called from informer threads
            # RuntimeError: the loop closed under a thread that has not stopped yet.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(dirty.set)

        informers = tuple(
            Informer(lw, lock, notify, self._settings, random.Random(self._rng.random()))
            for lw in list_watches(self._api_client)
        )
        self._informers = informers
        for i in informers:
            i.start()
        try:
            current: tuple[ServiceExport, ...] | None = None
            while True:
                await dirty.wait()
                if current is not None or not all(i.cache.synced for i in informers):
                    await asyncio.sleep(self._debounce)  # let the burst that woke us land
                dirty.clear()  # before reading: a later event sets it again
                with lock:
                    if not all(i.cache.synced for i in informers):
                        continue
                    objs = ClusterObjects(*(dict(i.cache.objects) for i in informers))
                exports, rejections = translate(objs, self._cluster, self._trust_domain)
                self._log_rejections(rejections)
                if exports != current:
                    current = exports
                    self.publishes += 1
                    yield exports
        finally:
            await asyncio.to_thread(_stop_all, informers)

    def _log_rejections(self, rejections: tuple[Rejection, ...]) -> None:
        if rejections != self.rejections:
            self.on_rejections()  # (the MCS write-back's poke: it reads them on this loop)
        known = set(self.rejections)
        for r in rejections:
            if r not in known:
                _log.warning(
                    "cluster %s: rejected %s %s/%s: %s",
                    self._cluster,
                    r.kind,
                    r.namespace,
                    r.name,
                    r.reason,
                    extra={"k8s_kind": r.kind, "k8s_namespace": r.namespace, "k8s_name": r.name},
                )
        self.rejections = rejections


def _stop_all(informers: tuple[Informer, ...]) -> None:
    for i in informers:
        i.stop(timeout=0)  # shut every socket down first, then wait for the threads
    for i in informers:
        i.stop()
