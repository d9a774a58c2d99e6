"""`EtcdMergedCatalog`: the merged catalog as agents read it, from the leader's status records.

`mesh.interfaces.MergedCatalog` for the agents' MCS write-back (ServiceImports and
ServiceExport conditions in their own cluster). The leader already writes one record per merged
service under `/fedgate/status/services/<ns>/<svc>` (federation.status: VIP, ports, clusters,
MCS conditions), and agents already hold an etcd client, so they read those records rather than
open a config stream of their own: no new credentials, no controller address, and the records
are exactly what `fedgate status` shows. A status record exists only for a merged service,
and the leader deletes it when the service leaves the catalog, so the set of records is the
set of ServiceImports a cluster should hold.

The feed loads the prefix, then follows it with a watch (`federation.store.EtcdWatcher`:
resumes after a broken watch, reloads after a compaction), and yields the decoded services,
sorted by key, whenever they change. A malformed record is logged once and skipped.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import structlog
from etcd3aio import Etcd3Client

from federation import keys
from federation.catalog import Changed, Loaded
from federation.status import service_status_from_json
from federation.store import EtcdWatcher
from mesh.codec import loads
from mesh.errors import CodecError
from mesh.model import MergedService

_log = structlog.get_logger("fedgate.federation.merged_feed")


class EtcdMergedCatalog:
    def __init__(self, client: Etcd3Client) -> None:
        self._watcher = EtcdWatcher(client, keys.SERVICE_STATUS_PREFIX)
        self._bad: set[tuple[str, bytes]] = set()  # malformed records already logged

    def _decode(self, key: str, raw: bytes) -> MergedService | None:
        try:
            return service_status_from_json(loads(raw, "service status"))
        except CodecError as e:
            if (key, raw) not in self._bad:
                self._bad.add((key, raw))
                _log.warning("skipping malformed service status", key=key, error=str(e))
            return None

    async def changes(self) -> AsyncGenerator[tuple[MergedService, ...], None]:
        records: dict[str, bytes] = {}
        last: tuple[MergedService, ...] | None = None
        async for batch in self._watcher.batches():
            match batch:
                case Loaded(events=events):
                    records = {e.key: e.value for e in events if e.value is not None}
                case Changed(events=events):
                    for e in events:
                        if e.value is None:
                            records.pop(e.key, None)
                        else:
                            records[e.key] = e.value
                case _:
                    raise AssertionError(f"unknown watch batch {batch!r}")
            decoded = (self._decode(k, v) for k, v in sorted(records.items()))
            services = tuple(sorted((s for s in decoded if s), key=lambda s: s.key))
            if services != last:
                last = services
                yield services
