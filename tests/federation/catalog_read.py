"""What a controller reads from `/fedgate/clusters/`, through the controller's own path.

`federation.store.load_prefix` (what `EtcdWatcher` yields first) fed to
`federation.catalog.CatalogView` (what the controller applies it to): the published clusters,
and the exports the merge would use. For tests and the benchmark that check what agents
published.
"""

from __future__ import annotations

from etcd3aio import Etcd3Client

from federation import keys
from federation.catalog import CatalogView, Problem
from federation.store import load_prefix
from mesh.model import ClusterInfo, ServiceExport

Catalog = tuple[tuple[ClusterInfo, ...], tuple[ServiceExport, ...]]


async def read_view(etcd: Etcd3Client) -> tuple[CatalogView, list[Problem]]:
    """One load of the catalog applied to a fresh view, and the keys it skipped."""
    view = CatalogView()
    changes = view.apply((await load_prefix(etcd, keys.CLUSTERS_PREFIX)).events)
    return view, changes.problems


async def read_catalog(etcd: Etcd3Client) -> Catalog:
    """Every cluster's info (by name) and the exports the merge uses (by service, cluster)."""
    view, _ = await read_view(etcd)
    exports = [x for s, by in view.exports.items() for x in view.exports_of(s, sorted(by))]
    return (
        tuple(sorted(view.infos.values(), key=lambda c: c.name)),
        tuple(sorted(exports, key=lambda x: (x.key, x.cluster))),
    )
