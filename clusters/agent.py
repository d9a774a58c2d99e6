"""The per-cluster agent: publishes its cluster's exports, endpoints and trust root.

It reads a `ClusterSource` (Kubernetes, or the rig's file) and writes through a
`CatalogPublisher` (etcd, wired by fedgate/) under its own cluster's prefix, attached to its
lease: a cluster whose agent dies expires from routing instead of lingering. It does not merge
anything (the controller does) and never writes another cluster's keys.
"""

from __future__ import annotations

import asyncio

import structlog

from mesh.interfaces import CatalogPublisher, ClusterSource
from mesh.model import ClusterInfo, ServiceExport

_log = structlog.get_logger("fedgate.agent")


class Agent:
    def __init__(
        self,
        info: ClusterInfo,
        source: ClusterSource,
        publisher: CatalogPublisher,
        retry_interval: float = 1.0,
    ) -> None:
        self.info = info
        self._source = source
        self._publisher = publisher
        self._retry = retry_interval
        self.exports: tuple[ServiceExport, ...] = ()
        self.published = False
        self._lock = asyncio.Lock()  # one publish at a time (source changes, new info)

    async def run(self) -> None:
        async for exports in self._source.changes():
            self.exports = exports
            await self._publish()

    async def set_info(self, info: ClusterInfo) -> None:
        """Publish new cluster info (e.g. the CA's roots after a rotation step)."""
        self.info = info
        if self.published or self._lock.locked():  # else the first publish will carry it
            await self._publish()

    async def _publish(self) -> None:
        async with self._lock:
            await self._publish_locked()

    async def _publish_locked(self) -> None:
        # The store may be briefly unreachable (etcd restart, member loss): keep trying with
        # the newest state rather than dropping it; the source's next change supersedes us.
        while True:
            try:
                await self._publisher.publish(self.info, self.exports)
            except Exception as e:  # adapter errors are logged and retried
                _log.warning("publish failed, retrying", error=str(e))
                await asyncio.sleep(self._retry)
                continue
            self.published = True
            _log.info(
                "published",
                exports=len(self.exports),
                endpoints=sum(len(x.endpoints) for x in self.exports),
            )
            return

    def status(self) -> dict[str, object]:
        return {
            "cluster": self.info.name,
            "trustDomain": self.info.trust_domain,
            "published": self.published,
            "exports": [
                {"service": str(x.key), "endpoints": [e.address for e in x.endpoints]}
                for x in self.exports
            ],
        }
