"""The leader's status write-back, part of the controller core: write only what changed.

It keeps what /fedgate/status/ holds (read once per term through the `LeaderWriter`, then
updated by its own writes) and the services whose status may have changed, and after each
sync puts and deletes only the keys whose value differs: the liveness records, the status
(conditions) of every touched service, and the config status when the version changed. The
records themselves are federation.status's; this module decides what to write, not how
records encode, and does no I/O of its own (the writer port does).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from federation import keys
from federation.catalog import CatalogView
from federation.controller_ports import LeaderWriter
from federation.liveness import ClusterLiveness
from federation.status import changed_keys, config_status_json, liveness_entries, service_entry
from mesh.codec import dumps, loads
from mesh.errors import CodecError
from mesh.model import MergedService, Snapshot
from mesh.naming import ServiceKey


class StatusWriteBack:
    def __init__(self, writer: LeaderWriter, replica: str) -> None:
        self._writer = writer
        self._replica = replica  # named as the leader in the config status
        self._cache: dict[str, bytes] | None = None  # what the status keys hold
        self._dirty: set[ServiceKey] = set()

    def forget(self) -> None:
        """Read the status keys again before the next write (leadership changed hands)."""
        self._cache = None

    def touch(self, services: Iterable[ServiceKey]) -> None:
        """These services' status may have changed: compare them at the next write."""
        self._dirty |= set(services)

    async def write(
        self,
        snapshot: Snapshot,
        merged: Mapping[ServiceKey, MergedService],
        view: CatalogView,
        liveness: Iterable[ClusterLiveness],
        admitted: Iterable[str],
        now: float,
        held: Mapping[str, Any] | None = None,
    ) -> int:
        """Write what changed; the number of operations written. Raises what the writer does."""
        full = self._cache is None
        if self._cache is None:
            self._cache = await self._writer.read_status()
            self._dirty = set(merged) | {
                keys.parse_service_key(keys.SERVICE_STATUS_PREFIX, k)
                for k in self._cache
                if k.startswith(keys.SERVICE_STATUS_PREFIX) and _is_service_key(k)
            }
        cache = self._cache
        wanted = liveness_entries(liveness)
        puts, deletes = changed_keys(
            {k: v for k, v in cache.items() if k.startswith(keys.CLUSTER_STATUS_PREFIX)},
            wanted,
            keys.CLUSTER_STATUS_PREFIX,
        )
        for key in self._dirty:
            status_key = keys.service_status_key(key)
            service = merged.get(key)
            if service is None:
                if status_key in cache:
                    deletes.append(status_key)
                continue
            exports = view.exports_of(key, service.clusters)
            _, value = service_entry(service, exports)
            if cache.get(status_key) != value:
                puts[status_key] = value
        config_value = dumps(
            config_status_json(
                snapshot.version,
                view.config().commit,
                self._replica,
                view.revision,
                admitted,
                len(snapshot.services),
                sum(len(s.endpoints) for s in snapshot.services),
                now,
                held,
            )
        )
        if full or _identity(cache.get(keys.CONFIG_STATUS_KEY)) != (snapshot.version, held):
            puts[keys.CONFIG_STATUS_KEY] = config_value
        written = 0
        if puts or deletes:
            written = await self._writer.write_status(puts, deletes)
        cache.update(puts)
        for k in deletes:
            cache.pop(k, None)
        self._dirty = set()
        return written


def _is_service_key(key: str) -> bool:
    try:
        keys.parse_service_key(keys.SERVICE_STATUS_PREFIX, key)
    except ValueError:
        return False
    return True


def _identity(raw: bytes | None) -> tuple[str, Any]:
    """What decides a rewrite of the config status: its version and hold."""
    if raw is None:
        return "", None
    try:
        value = loads(raw, "config status")
    except CodecError:
        return "", None
    return str(value.get("version", "")), value.get("held")
