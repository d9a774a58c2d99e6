"""What only the leading replica of a cluster's agent does, switched by leader election.

With two agent replicas (Kubernetes, `clusters.kube.lease`), both read the cluster and serve
the CA and the webhook, but only the leader writes: catalog publishing to etcd and the
leader-only tasks (the MCS write-back, and any other controller that writes to the cluster).
Two publishers would attach the cluster's keys to two etcd leases, and the one that stops
would take the catalog with it.

* `GatedPublisher` is the agent's `CatalogPublisher`: it always remembers the newest state,
  and writes it through a fresh inner publisher (its own etcd lease) while leading. On
  becoming leader it publishes that state at once (retrying until it lands or leadership
  ends); on losing leadership, and on close, it *abandons* the inner publisher's lease rather
  than revoking it: the keys stay until the new leader overwrites them under its own lease,
  or expire after the lease TTL when no other replica takes over. Handing over never empties
  the cluster's catalog.
* `LeaderTasks` runs named coroutines only while leading, and cancels them on stepping down.

`set_leading` is the election's `on_change` callback. No election (the rig's file source):
the agent uses its publisher directly, and this module is not involved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

import structlog

from mesh.model import ClusterInfo, ServiceExport
from mesh.tasks import TaskSet

_log = structlog.get_logger("fedgate.agent.leadership")


class LeasedPublisher(Protocol):
    """A `CatalogPublisher` that can also stop renewing without revoking (etcd's)."""

    async def publish(self, info: ClusterInfo, exports: Sequence[ServiceExport]) -> None: ...

    async def abandon(self) -> None: ...


class GatedPublisher:
    def __init__(self, make: Callable[[], LeasedPublisher], retry_interval: float = 1.0) -> None:
        self._make = make
        self._retry = retry_interval
        self._inner: LeasedPublisher | None = None
        self._state: tuple[ClusterInfo, tuple[ServiceExport, ...]] | None = None
        self._lock = asyncio.Lock()  # one write at a time, and none during a hand-over
        self._tasks = TaskSet("gated-publisher")
        self._catch_up: asyncio.Task[None] | None = None
        self.writes = 0  # metric: publishes that went through to the store

    @property
    def leading(self) -> bool:
        return self._inner is not None

    async def publish(self, info: ClusterInfo, exports: Sequence[ServiceExport]) -> None:
        self._state = (info, tuple(exports))
        async with self._lock:
            if self._inner is not None:  # a follower only remembers the state
                await self._inner.publish(*self._state)
                self.writes += 1

    async def set_leading(self, leading: bool) -> None:
        if leading and self._inner is None:
            self._inner = self._make()
            self._catch_up = self._tasks.spawn(self._publish_latest(), "publish-on-lead")
        elif not leading and self._inner is not None:
            await self._abandon()

    async def aclose(self) -> None:
        await self._abandon()
        await self._tasks.aclose()

    async def _abandon(self) -> None:
        if self._catch_up is not None:
            self._catch_up.cancel()
            self._catch_up = None
        async with self._lock:
            inner, self._inner = self._inner, None
            if inner is not None:
                await inner.abandon()

    async def _publish_latest(self) -> None:
        # The store may be unreachable when we take over: keep trying with the newest state
        # (a later `publish` also writes it; whichever lands first, the store converges).
        while True:
            try:
                async with self._lock:
                    if self._inner is None or self._state is None:
                        return  # stepped down, or nothing read yet (the first publish comes)
                    await self._inner.publish(*self._state)
                    self.writes += 1
                    return
            except Exception as e:  # adapter errors are logged and retried
                _log.warning("publish on taking the lead failed, retrying", error=str(e))
            await asyncio.sleep(self._retry)


class LeaderTasks:
    """Coroutines that run only while this replica leads (restarted on each new term)."""

    def __init__(self) -> None:
        self._factories: list[tuple[str, Callable[[], Coroutine[Any, Any, Any]]]] = []
        self._running = TaskSet("leader-tasks")
        self.leading = False

    def add(self, name: str, factory: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        self._factories.append((name, factory))
        if self.leading:
            self._running.spawn(factory(), name)

    async def set_leading(self, leading: bool) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        if leading:
            for name, factory in self._factories:
                self._running.spawn(factory(), name)
        else:
            await self._running.aclose()
            self._running = TaskSet("leader-tasks")

    async def aclose(self) -> None:
        await self._running.aclose()
