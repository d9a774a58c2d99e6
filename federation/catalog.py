"""The controller's in-memory view of /fedgate/, pure: etcd key events in, decoded state out.

The driver (federation.store.EtcdWatcher) loads every key under /fedgate/ at one revision and
then feeds the watch's events in order; `apply` decodes them and says what changed, so the
controller re-merges only the services an event touched instead of reloading 100,000 endpoints.
After a compaction the driver calls `reset()` and loads again.

Keys come from a store every agent writes to, so nothing is trusted (as in federation.store):
a key off the layout, a value that does not decode, an export naming another cluster or service
than its key, endpoints of other clusters: the key is skipped and reported in
`Changes.problems` (the driver logs each bad version once). Endpoints whose identities are in
another trust domain than their cluster's `info` are dropped at merge time (`exports_of`), since
the `info` may arrive after the export.

Departed clusters: when a cluster's `info` key goes (its lease expired or was revoked, or a
reload no longer finds it), the view keeps that cluster's last info and exports in `departed`,
so the controller can keep routing a Detached cluster on its last catalog
(federation.liveness) until it returns (its `info` reappears: the copy goes) or the controller
gives up on it (`drop_departed`). Exports deleted in the same batch as the info are part of
that copy: a lease expiry deletes every key of the cluster in one revision, in key order, so
the exports go before the info. An export deleted while the info stays is a real removal.

Tracked: cluster infos and exports, VIPs, everything under /fedgate/config/, the liveness
records under /fedgate/status/clusters/, and /fedgate/leader. Other keys (the leader's service
status) are ignored, so the leader's own status writes never wake the controller.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from federation import keys
from federation.fedconfig import ConfigProblem, FederationConfig, config_from_entries
from federation.liveness import ClusterLiveness
from federation.status import liveness_from_json
from federation.vip import usable
from mesh.codec import cluster_from_json, decode, export_from_json, loads
from mesh.errors import MeshError
from mesh.model import ClusterInfo, ServiceExport
from mesh.naming import ServiceKey


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """One key's new value (None: deleted) at etcd revision `revision`."""

    key: str
    value: bytes | None
    revision: int


@dataclass(frozen=True, slots=True)
class Loaded:
    """Every key under the prefix at `revision`: replace the whole view."""

    events: tuple[KeyEvent, ...]
    revision: int


@dataclass(frozen=True, slots=True)
class Changed:
    """The events of one watch response, in revision order."""

    events: tuple[KeyEvent, ...]
    revision: int


@dataclass(frozen=True, slots=True)
class Problem:
    key: str
    revision: int
    error: str


@dataclass(frozen=True, slots=True)
class Departed:
    """The last catalog of a cluster whose `info` key went away."""

    info: ClusterInfo
    exports: dict[ServiceKey, ServiceExport]


@dataclass(slots=True)
class Changes:
    """What a batch of events changed."""

    services: set[ServiceKey] = field(default_factory=set)  # exports or VIP changed
    clusters: set[str] = field(default_factory=set)  # info appeared, changed or vanished
    config: bool = False
    liveness: bool = False
    leader: bool = False
    problems: list[Problem] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.services or self.clusters or self.config or self.liveness or self.leader)

    def update(self, other: Changes) -> None:
        self.services |= other.services
        self.clusters |= other.clusters
        self.config = self.config or other.config
        self.liveness = self.liveness or other.liveness
        self.leader = self.leader or other.leader
        self.problems += other.problems


class CatalogView:
    def __init__(self) -> None:
        self.departed: dict[str, Departed] = {}
        self._batch_deleted: dict[str, dict[ServiceKey, ServiceExport]] = {}
        self._batch_departed: dict[str, ClusterInfo] = {}
        self.reset()

    def reset(self) -> None:
        """Forget everything but `departed` (a reload keeps what it no longer finds there)."""
        self.infos: dict[str, ClusterInfo] = {}
        self.exports: dict[ServiceKey, dict[str, ServiceExport]] = {}
        self.by_cluster: dict[str, set[ServiceKey]] = {}
        self.vips: dict[ServiceKey, str] = {}
        self.config_entries: dict[str, bytes] = {}
        self.liveness: dict[str, ClusterLiveness] = {}
        self.leader: bytes | None = None
        self.revision = 0
        self._config: FederationConfig | None = None
        self._config_problems: tuple[ConfigProblem, ...] = ()

    # --- queries ----------------------------------------------------------------------------

    def info_of(self, cluster: str) -> ClusterInfo | None:
        """The cluster's info, or the last one it had if it departed."""
        info = self.infos.get(cluster)
        if info is None and cluster in self.departed:
            info = self.departed[cluster].info
        return info

    def exports_of(self, service: ServiceKey, clusters: Iterable[str]) -> list[ServiceExport]:
        """The exports of `service` by `clusters` whose endpoints are in their trust domain
        (a departed cluster's: from its last catalog)."""
        by_cluster = self.exports.get(service, {})
        out = []
        for cluster in clusters:
            x = by_cluster.get(cluster)
            info = self.infos.get(cluster)
            if info is None and cluster in self.departed:
                info = self.departed[cluster].info
                x = self.departed[cluster].exports.get(service)
            if x is None or info is None:
                continue
            if any(e.identity.trust_domain != info.trust_domain for e in x.endpoints):
                continue
            out.append(x)
        return out

    def services_of(self, clusters: Iterable[str]) -> set[ServiceKey]:
        out: set[ServiceKey] = set()
        for c in clusters:
            out |= self.by_cluster.get(c, set())
            if c in self.departed:
                out |= set(self.departed[c].exports)
        return out

    def drop_departed(self, clusters: Iterable[str]) -> set[ServiceKey]:
        """Forget the last catalog of these departed clusters; the services it held."""
        out: set[ServiceKey] = set()
        for c in clusters:
            gone = self.departed.pop(c, None)
            if gone is not None:
                out |= set(gone.exports)
        return out

    def config(self) -> FederationConfig:
        if self._config is None:
            self._config, self._config_problems = config_from_entries(self.config_entries)
        return self._config

    @property
    def config_problems(self) -> tuple[ConfigProblem, ...]:
        self.config()
        return self._config_problems

    # --- the transition -------------------------------------------------------------------

    def apply(self, events: Iterable[KeyEvent]) -> Changes:
        changes = Changes()
        self._batch_deleted, self._batch_departed = {}, {}
        for ev in events:
            self.revision = max(self.revision, ev.revision)
            try:
                self._apply(ev, changes)
            except (ValueError, MeshError) as e:
                changes.problems.append(Problem(ev.key, ev.revision, str(e)))
                self._forget(ev.key, changes)  # a bad new value replaces the old good one
        for cluster, info in self._batch_departed.items():
            if cluster in self.infos:  # it came back within the batch
                continue
            exports = dict(self._batch_deleted.get(cluster, {}))
            for service in self.by_cluster.get(cluster, set()):
                exports[service] = self.exports[service][cluster]
            self.departed[cluster] = Departed(info, exports)
        return changes

    def reload(self, events: Iterable[KeyEvent]) -> Changes:
        """A full load replacing the view; clusters it no longer holds become departed."""
        before = {
            c: Departed(info, {k: self.exports[k][c] for k in self.by_cluster.get(c, set())})
            for c, info in self.infos.items()
        }
        self.reset()
        changes = self.apply(events)
        for cluster, last in before.items():
            if cluster not in self.infos:
                self.departed[cluster] = last
                changes.clusters.add(cluster)
                changes.services |= set(last.exports)
        return changes

    def _apply(self, ev: KeyEvent, changes: Changes) -> None:
        key = ev.key
        if key.startswith(keys.CLUSTERS_PREFIX):
            parsed = keys.parse_cluster_key(key)
            if ev.value is None:
                self._forget(key, changes)
            elif parsed.service is None:
                self._put_info(parsed.cluster, ev.value, key, changes)
            else:
                self._put_export(parsed.cluster, parsed.service, ev.value, key, ev, changes)
        elif key.startswith(keys.VIPS_PREFIX):
            service = keys.parse_service_key(keys.VIPS_PREFIX, key)
            old = self.vips.pop(service, None)
            if ev.value is not None:
                value = ev.value.decode("utf-8", "replace").strip()
                try:
                    good = usable(ipaddress.IPv4Address(value))
                except ValueError:
                    good = False
                if good:
                    self.vips[service] = value
                else:  # the leader reallocates it (federation.owned)
                    changes.problems.append(Problem(key, ev.revision, f"VIP {value!r} unusable"))
            if self.vips.get(service) != old:
                changes.services.add(service)
        elif key.startswith(keys.CONFIG_PREFIX):
            if ev.value is None:
                self.config_entries.pop(key, None)
            else:
                self.config_entries[key] = bytes(ev.value)
            self._config = None
            changes.config = True
        elif key.startswith(keys.CLUSTER_STATUS_PREFIX):
            cluster = keys.parse_cluster_status_key(key)
            changes.liveness = True
            self.liveness.pop(cluster, None)
            if ev.value is not None:
                record = liveness_from_json(loads(ev.value, key))
                if record.cluster != cluster:
                    raise ValueError(f"record of cluster {record.cluster!r}")
                self.liveness[cluster] = record
        elif key == keys.LEADER_KEY:
            self.leader = None if ev.value is None else bytes(ev.value)
            changes.leader = True

    def _put_info(self, cluster: str, raw: bytes, key: str, changes: Changes) -> None:
        info: ClusterInfo = decode(raw, cluster_from_json, key)
        if info.name != cluster:
            raise ValueError(f"info names cluster {info.name!r}")
        self.departed.pop(cluster, None)  # back: its live keys replace the last catalog
        if self.infos.get(cluster) != info:
            self.infos[cluster] = info
            changes.clusters.add(cluster)
            changes.services |= self.by_cluster.get(cluster, set())

    def _put_export(
        self,
        cluster: str,
        service: ServiceKey,
        raw: bytes,
        key: str,
        ev: KeyEvent,
        changes: Changes,
    ) -> None:
        export: ServiceExport = decode(raw, export_from_json, key)
        if export.cluster != cluster or export.key != service:
            raise ValueError(f"value is the export of {export.key} in {export.cluster!r}")
        foreign = sorted({e.cluster for e in export.endpoints} - {cluster})
        if foreign:
            raise ValueError(f"endpoints of other clusters {foreign}")
        info = self.infos.get(cluster)
        domains = {e.identity.trust_domain for e in export.endpoints}
        if info is not None and domains - {info.trust_domain}:
            # Kept (the info may change) but never merged; reported once per version.
            changes.problems.append(
                Problem(key, ev.revision, f"endpoint identities outside {info.trust_domain!r}")
            )
        self.exports.setdefault(service, {})[cluster] = export
        self.by_cluster.setdefault(cluster, set()).add(service)
        changes.services.add(service)

    def _forget(self, key: str, changes: Changes) -> None:
        """Drop whatever `key` held (a deletion, or a value that no longer decodes)."""
        try:
            parsed = keys.parse_cluster_key(key)
        except ValueError:
            return
        if parsed.service is None:
            info = self.infos.pop(parsed.cluster, None)
            if info is not None:
                self._batch_departed[parsed.cluster] = info
                changes.clusters.add(parsed.cluster)
                changes.services |= self.by_cluster.get(parsed.cluster, set())
            return
        by_cluster = self.exports.get(parsed.service)
        gone = None if by_cluster is None else by_cluster.pop(parsed.cluster, None)
        if by_cluster is not None and gone is not None:
            self._batch_deleted.setdefault(parsed.cluster, {})[parsed.service] = gone
            if not by_cluster:
                del self.exports[parsed.service]
            services = self.by_cluster.get(parsed.cluster, set())
            services.discard(parsed.service)
            if not services:
                self.by_cluster.pop(parsed.cluster, None)
            changes.services.add(parsed.service)
