"""Ports: the interfaces adapters implement and only fedgate/ wires together."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from mesh.model import ClusterInfo, ServiceExport, Snapshot, TrafficPolicy


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...


class CatalogPublisher(Protocol):
    """What a cluster agent writes: its own cluster's state, attached to its lease."""

    async def publish(self, info: ClusterInfo, exports: Sequence[ServiceExport]) -> None: ...

    async def aclose(self) -> None: ...


class ClusterSource(Protocol):
    """Where an agent learns its cluster's exports and endpoints (Kubernetes, a file, ...)."""

    def changes(self) -> AsyncIterator[tuple[ServiceExport, ...]]: ...


class CatalogState(Protocol):
    """The controller's read side of the store: every cluster's published state."""

    async def load(self) -> tuple[tuple[ClusterInfo, ...], tuple[ServiceExport, ...]]: ...


class ConfigSubscriber(Protocol):
    """A proxy's view of the config stream."""

    def snapshots(self) -> AsyncIterator[Snapshot]: ...


class PolicySource(Protocol):
    def policies(self) -> tuple[TrafficPolicy, ...]: ...
