"""`GatewayServiceWatcher`: the address the gateway's load balancer answers on, followed.

One informer (informer.py: list, then watch, resumed and relisted as client-go's reflector
does) on the Services of the gateway's namespace; `changes()` yields `(host, port)` from the
named Service's `status.loadBalancer.ingress` (`clusters.published`: the first entry's `ip`,
else its `hostname`, and the tunnel port) whenever it changes, and None while the Service is
missing or its load balancer has no address yet. The first value comes once the informer has
listed. Equal consecutive values are not yielded twice.

It decides nothing about what to publish meanwhile (the agent's wiring falls back to
`--gateway-tunnel` or waits) and resolves no hostname (the peers' gateways do).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import threading
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import kubernetes

from clusters.kube.informer import Informer, InformerSettings, ListWatch
from clusters.published import published_host, published_port

Tunnel = tuple[str, int] | None


def parse_service_ref(ref: str) -> tuple[str, str]:
    """`<namespace>/<name>` → (namespace, name)."""
    namespace, slash, name = ref.partition("/")
    if not (namespace and slash and name) or "/" in name:
        raise ValueError(f"a gateway Service is <namespace>/<name>, got {ref!r}")
    return namespace, name


def tunnel_of(service: Mapping[str, Any] | None) -> Tunnel:
    if service is None:
        return None
    host = published_host(service)
    return None if host is None else (host, published_port(service))


class GatewayServiceWatcher:
    def __init__(
        self,
        api_client: Any,
        namespace: str,
        name: str,
        *,
        settings: InformerSettings | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.namespace, self.name = namespace, name
        core = kubernetes.client.CoreV1Api(api_client)
        self._lw = ListWatch("Service", functools.partial(core.list_namespaced_service, namespace))
        self._settings = settings or InformerSettings()
        self._rng = rng or random.Random()
        self.current: Tunnel = None
        self.updates = 0  # values yielded

    def status(self) -> dict[str, object]:
        host_port = None if self.current is None else f"{self.current[0]}:{self.current[1]}"
        return {"service": f"{self.namespace}/{self.name}", "published": host_port}

    async def changes(self) -> AsyncGenerator[Tunnel, None]:
        loop = asyncio.get_running_loop()
        dirty = asyncio.Event()
        lock = threading.Lock()

        def notify() -> None:  # called from the informer's thread
            with contextlib.suppress(RuntimeError):  # the loop closed first
                loop.call_soon_threadsafe(dirty.set)

        informer = Informer(self._lw, lock, notify, self._settings, self._rng)
        informer.start()
        first = True
        try:
            while True:
                await dirty.wait()
                dirty.clear()  # before reading: a later event sets it again
                with lock:
                    if not informer.cache.synced:
                        continue
                    service = informer.cache.objects.get((self.namespace, self.name))
                tunnel = tunnel_of(service)
                if first or tunnel != self.current:
                    first = False
                    self.current = tunnel
                    self.updates += 1
                    yield tunnel
        finally:
            await asyncio.to_thread(_stop, informer)


def _stop(informer: Informer) -> None:
    informer.stop(timeout=0)
    informer.stop()
