"""The fake API server's storage: objects, one global resourceVersion, a bounded event history.

It behaves like etcd behind kube-apiserver's watch cache: every write bumps one cluster-wide
resourceVersion (a decimal integer on the wire, opaque to clients), a no-op write bumps
nothing, watches replay the history after a version, and `compact()` (or the history growing
past `history_limit`) forgets old events, after which a watch from an older version is answered
410 Expired. Server-assigned metadata (uid, resourceVersion, creationTimestamp, generation for
custom resources) and Service defaults (clusterIP, type, port protocol and targetPort) are set
as the real server sets them; client-supplied values for them are ignored.

Cluster-scoped resources (namespaces, webhook configurations) are stored under namespace "";
deleting a namespace deletes what it holds. Not modelled: graceful deletion (pods and
namespaces vanish at once), finalizers, owner references, admission, validation beyond names
and `builtin.validate`, refusing objects in a missing namespace, pagination (`limit` is
ignored: a list is always complete).
"""

from __future__ import annotations

import builtins
import copy
import ipaddress
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from tests.kubefake import apply as ssa
from tests.kubefake import builtin
from tests.kubefake.resources import Obj, Resource, status
from tests.kubefake.selectors import FieldSelector, Selector

ANY_FIELDS = FieldSelector()
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/12")


class StoreError(Exception):
    """A request the store refuses; `body` is the Status object the server answers with."""

    def __init__(self, body: Obj) -> None:
        super().__init__(body["message"])
        self.body = body
        self.code: int = body["code"]


@dataclass(frozen=True, slots=True)
class Event:
    rv: int
    resource: Resource
    type: str  # ADDED, MODIFIED or DELETED
    obj: Obj
    prev: Obj | None  # the object before a MODIFIED, for selector transitions


def rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _meta(obj: Obj) -> Obj:
    meta = obj.setdefault("metadata", {})
    assert isinstance(meta, dict)
    return meta


def _spec(res: Resource, obj: Obj) -> object:
    """What `metadata.generation` counts changes of (EndpointSlices and webhook configurations
    have no `spec`)."""
    if res.plural == "endpointslices":
        return (obj.get("endpoints"), obj.get("ports"), obj.get("addressType"))
    if res.plural == "mutatingwebhookconfigurations":
        return obj.get("webhooks")
    return obj.get("spec")


def _labels(obj: Obj | None) -> dict[str, str]:
    if obj is None:
        return {}
    labels = obj.get("metadata", {}).get("labels") or {}
    return dict(labels)


class Store:
    def __init__(self, clock: Callable[[], float] = time.time, history_limit: int = 10_000) -> None:
        self.cond = threading.Condition()
        self.clock = clock
        self.history_limit = history_limit
        self.rv = 100  # real clusters never start at 1; nothing may assume small numbers
        self.compacted = self.rv  # the history holds every event with rv > compacted
        self.objects: dict[Resource, dict[tuple[str, str], Obj]] = {}
        self.history: list[Event] = []
        # Generations watchers poll: a change makes them send a bookmark / drop the connection.
        self.bookmarks = 0
        self.drops = 0
        self.drop_partial = False
        # Server-side apply ownership per object: (resource, ns, name) -> manager key -> paths.
        self.managed: dict[tuple[Resource, str, str], ssa.Managed] = {}
        self.stamps: dict[tuple[Resource, str, str], dict[str, str]] = {}
        self._ips = itertools.islice(SERVICE_CIDR.hosts(), 10, None)

    # --- reads --------------------------------------------------------------------------

    def get(self, res: Resource, namespace: str, name: str) -> Obj:
        with self.cond:
            obj = self.objects.get(res, {}).get((namespace, name))
            if obj is None:
                qualified = f"{res.plural}.{res.group}" if res.group else res.plural
                raise StoreError(
                    status(
                        404,
                        "NotFound",
                        f'{qualified} "{name}" not found',
                        {"name": name, "group": res.group, "kind": res.plural},
                    )
                )
            return copy.deepcopy(obj)

    def list(
        self,
        res: Resource,
        namespace: str | None,
        selector: Selector,
        fields: FieldSelector = ANY_FIELDS,
    ) -> tuple[list[Obj], int]:
        with self.cond:
            items = [
                copy.deepcopy(o)
                for (ns, _), o in sorted(self.objects.get(res, {}).items())
                if (namespace is None or ns == namespace)
                and selector.matches(_labels(o))
                and fields.matches(o)
            ]
            return items, self.rv

    def events_after(
        self,
        rv: int,
        res: Resource,
        namespace: str | None,
        selector: Selector,
        fields: FieldSelector = ANY_FIELDS,
    ) -> builtins.list[tuple[str, Obj]]:
        """Events after `rv` as a watcher with this filter sees them (call with `cond` held).

        An object modified into the selector is ADDED for the watcher, one modified out of it
        DELETED, as the watch cache does. Raises StoreError(410) if `rv` was compacted away.
        """
        if rv < self.compacted:
            raise StoreError(
                status(410, "Expired", f"too old resource version: {rv} ({self.compacted + 1})")
            )
        out: builtins.list[tuple[str, Obj]] = []
        for e in self.history:
            if e.rv <= rv or e.resource != res:
                continue
            if namespace is not None and e.obj["metadata"].get("namespace") != namespace:
                continue
            if not fields.matches(e.obj):  # name and namespace: no transitions to track
                continue
            now = selector.matches(_labels(e.obj))
            before = e.prev is not None and selector.matches(_labels(e.prev))
            if e.type == "MODIFIED" and now and not before:
                out.append(("ADDED", e.obj))
            elif e.type == "MODIFIED" and before and not now:
                out.append(("DELETED", e.obj))
            elif now:
                out.append((e.type, e.obj))
        return out

    # --- writes -------------------------------------------------------------------------

    def _record(self, res: Resource, type_: str, obj: Obj, prev: Obj | None) -> None:
        self.history.append(Event(self.rv, res, type_, copy.deepcopy(obj), prev))
        if len(self.history) > self.history_limit:
            self.compact(self.history[len(self.history) - self.history_limit].rv)
        self.cond.notify_all()

    def create(self, res: Resource, obj: Obj, namespace: str | None = None) -> Obj:
        obj = copy.deepcopy(obj)
        meta = _meta(obj)
        ns = (namespace or meta.get("namespace") or "default") if res.namespaced else ""
        name = meta.get("name")
        if not name:
            raise StoreError(status(422, "Invalid", "metadata.name: Required value"))
        with self.cond:
            bucket = self.objects.setdefault(res, {})
            if (ns, name) in bucket:
                qualified = f"{res.plural}.{res.group}" if res.group else res.plural
                raise StoreError(
                    status(
                        409,
                        "AlreadyExists",
                        f'{qualified} "{name}" already exists',
                        {"name": name, "group": res.group, "kind": res.plural},
                    )
                )
            self.rv += 1
            obj["apiVersion"], obj["kind"] = res.api_version, res.kind
            for server_set in ("uid", "resourceVersion", "creationTimestamp", "generation"):
                meta.pop(server_set, None)
            meta.update(
                uid=str(uuid.uuid4()),
                resourceVersion=str(self.rv),
                creationTimestamp=rfc3339(self.clock()),
            )
            if res.namespaced:
                meta["namespace"] = ns
            else:
                meta.pop("namespace", None)
            if not res.builtin or res.plural in builtin.GENERATION:
                meta["generation"] = 1
            self._defaults(res, obj)
            builtin.validate(res, obj)
            bucket[(ns, name)] = obj
            self._record(res, "ADDED", obj, None)
            return copy.deepcopy(obj)

    def update(
        self, res: Resource, obj: Obj, *, subresource: str = "", check_rv: bool = True
    ) -> Obj:
        """Replace an object (PUT). With a status subresource, a write to the main resource
        keeps the stored status and a write to `status` changes nothing else."""
        obj = copy.deepcopy(obj)
        meta = _meta(obj)
        ns, name = meta.get("namespace") or "default", meta.get("name", "")
        if not res.namespaced:
            ns = ""
            meta.pop("namespace", None)
        with self.cond:
            old = self.get(res, ns, name)
            sent_rv = meta.get("resourceVersion")
            if check_rv and sent_rv and sent_rv != old["metadata"]["resourceVersion"]:
                raise StoreError(
                    status(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on {res.plural} "{name}": the object '
                        "has been modified; please apply your changes to the latest version "
                        "and try again",
                    )
                )
            new = copy.deepcopy(old)
            if subresource == "status":
                new["status"] = obj.get("status", {})
            else:
                kept_status = old.get("status")
                new = {k: v for k, v in obj.items() if k != "status"}
                if res.status_subresource and kept_status is not None:
                    new["status"] = kept_status
                elif "status" in obj:
                    new["status"] = obj["status"]
                new_meta = _meta(new)
                for server_set in ("uid", "creationTimestamp", "namespace", "name", "generation"):
                    if server_set in old["metadata"]:
                        new_meta[server_set] = old["metadata"][server_set]
                new["apiVersion"], new["kind"] = res.api_version, res.kind
            fields = meta.get("managedFields", old["metadata"].get("managedFields"))
            if fields is not None:
                _meta(new)["managedFields"] = fields
            _meta(new)["resourceVersion"] = old["metadata"]["resourceVersion"]
            self._defaults(res, new)
            builtin.validate(res, new)
            if new == old:
                return old  # a no-op write is not an event and bumps no version
            if "generation" in old["metadata"] and _spec(res, new) != _spec(res, old):
                _meta(new)["generation"] = old["metadata"]["generation"] + 1
            self.rv += 1
            _meta(new)["resourceVersion"] = str(self.rv)
            self.objects[res][(ns, name)] = new
            self._record(res, "MODIFIED", new, old)
            return copy.deepcopy(new)

    def delete(self, res: Resource, namespace: str, name: str) -> Obj:
        with self.cond:
            obj = self.get(res, namespace, name)
            if res.plural == "namespaces":
                # The namespace controller empties it (here at once: no graceful deletion).
                for other, bucket in list(self.objects.items()):
                    for ns, n in [k for k in bucket if k[0] == name and other.namespaced]:
                        self.delete(other, ns, n)
            del self.objects[res][(namespace, name)]
            self.managed.pop((res, namespace, name), None)
            self.stamps.pop((res, namespace, name), None)
            self.rv += 1
            # The DELETED event carries the object's last state at the deletion's version.
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self._record(res, "DELETED", obj, None)
            return obj

    def apply(
        self,
        res: Resource,
        namespace: str,
        name: str,
        config: Obj,
        manager: str,
        *,
        subresource: str = "",
        force: bool = False,
    ) -> tuple[Obj, bool]:
        """Server-side apply; returns (object, created). Raises ApplyConflictError."""
        key = (res, namespace, name)
        mkey = f"{manager}|{subresource}" if subresource else manager
        with self.cond:
            try:
                existing, created = self.get(res, namespace, name), False
            except StoreError as e:
                if e.code != 404 or subresource:
                    raise
                existing = {"metadata": {"name": name}}
                if res.namespaced:
                    existing["metadata"]["namespace"] = namespace
                created = True
            managed = {m: set(p) for m, p in self.managed.get(key, {}).items()}
            new = ssa.apply(existing, config, managed, mkey, subresource, force)
            if not created and new == existing and managed == self.managed.get(key, {}):
                return existing, False  # a no-op apply changes nothing, not even timestamps
            stamps = self.stamps.setdefault(key, {})
            stamps[mkey] = rfc3339(self.clock())
            _meta(new)["managedFields"] = ssa.managed_fields(managed, res.api_version, stamps)
            if created:
                obj = self.create(res, new, namespace)
            else:
                obj = self.update(res, new, subresource=subresource, check_rv=False)
            self.managed[key] = managed
            return obj, created

    # --- test hooks ---------------------------------------------------------------------

    def compact(self, upto: int | None = None) -> None:
        """Forget history up to `upto` (default: all of it), as etcd compaction does."""
        with self.cond:
            self.compacted = self.rv if upto is None else min(upto, self.rv)
            self.history = [e for e in self.history if e.rv > self.compacted]
            self.cond.notify_all()

    def bookmark_now(self) -> None:
        with self.cond:
            self.bookmarks += 1
            self.cond.notify_all()

    def drop_watches(self, *, partial: bool = False) -> None:
        """Make every open watch close its connection abruptly (no terminating chunk); with
        `partial`, after writing half of an event line first."""
        with self.cond:
            self.drops += 1
            self.drop_partial = partial
            self.cond.notify_all()

    # --- defaulting ---------------------------------------------------------------------

    def _defaults(self, res: Resource, obj: Obj) -> None:
        """The defaults kube-apiserver fills in (pkg/apis/*/v1/defaults.go), for what we serve."""
        builtin.defaults(res, obj)
        if res.plural == "pods":
            self._pod_defaults(obj)
        elif res.plural == "endpointslices":
            for port in obj.get("ports") or []:
                port.setdefault("protocol", "TCP")
        if res.plural != "services":
            return
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        if "clusterIP" not in spec:
            spec["clusterIP"] = str(next(self._ips))
        if spec["clusterIP"] != "None":
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
        for port in spec.get("ports", []):
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
        obj.setdefault("status", {"loadBalancer": {}})

    @staticmethod
    def _pod_defaults(obj: Obj) -> None:
        spec = obj.setdefault("spec", {})
        spec.setdefault("serviceAccountName", spec.get("serviceAccount") or "default")
        spec.setdefault("serviceAccount", spec["serviceAccountName"])  # the deprecated alias
        for key, value in (
            ("restartPolicy", "Always"),
            ("terminationGracePeriodSeconds", 30),
            ("dnsPolicy", "ClusterFirst"),
            ("securityContext", {}),
            ("schedulerName", "default-scheduler"),
            ("enableServiceLinks", True),
            ("priority", 0),
            ("preemptionPolicy", "PreemptLowerPriority"),
        ):
            spec.setdefault(key, value)
        for c in spec.get("containers") or []:
            c.setdefault("resources", {})
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            latest = ":" not in str(c.get("image", "")).rsplit("/", 1)[-1] or str(
                c.get("image")
            ).endswith(":latest")
            c.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
        status = obj.setdefault("status", {})
        status.setdefault("phase", "Pending")
        status.setdefault("qosClass", "BestEffort")
