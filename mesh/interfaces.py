"""Ports: the interfaces adapters implement and only fedgate/ wires together."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from mesh.model import ClusterInfo, MergedService, ServiceExport


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


class MergedCatalog(Protocol):
    """Where an agent learns the federation's merged services (VIP, ports, clusters and MCS
    conditions) to write them back into its cluster as ServiceImports and export status."""

    def changes(self) -> AsyncIterator[tuple[MergedService, ...]]: ...
