"""The rig's state file: what was created, where, and which processes run in it.

`<rigdir>/state.json` records the prefix, the clusters, the pods (with their addresses and the
next pod index per cluster, so an address is never reused within one rig), the processes started
(pid, netns, argv, log) and what was created and must be undone. Values are frozen dataclasses;
`update` does a locked, atomic read-modify-write.

The state is a convenience, not the source of truth for cleanup: `netns.delete_all` sweeps by
prefix, so a missing or stale state file (after a crash) never leaves namespaces behind. This
module runs no command and creates no namespace.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ca.files import atomic_write, locked
from clusters.rig import topology
from clusters.rig.errors import StateError

FORMAT_VERSION = 1
STATE_FILE_NAME = "state.json"


@dataclass(frozen=True, slots=True)
class ClusterRecord:
    name: str
    index: int
    netns: str
    wan_ip: str
    pod_subnet: str
    pod_net: int = -1  # topology.pod_net (-1: its own index, as in a state written before it)

    @property
    def net(self) -> int:
        return self.index if self.pod_net < 0 else self.pod_net


@dataclass(frozen=True, slots=True)
class PodRecord:
    cluster: str
    name: str
    namespace: str  # the Kubernetes namespace the pod's workload runs in
    service_account: str
    netns: str
    ip: str
    veth: str  # the veth end inside the cluster netns
    index: int


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    name: str
    pid: int
    netns: str
    argv: tuple[str, ...]
    log_path: str
    # /proc/<pid>/stat starttime: lets `stop` refuse to signal a recycled pid after a crash.
    start_ticks: int | None = None
    # How often the rig's supervisor started it again after it died (`restart.py`).
    restarts: int = 0


@dataclass(frozen=True, slots=True)
class Created:
    """Something the rig made that must be undone: kind "netns" or "path" (file or dir)."""

    kind: str
    name: str


def _frozen_counters(counters: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(counters))


@dataclass(frozen=True, slots=True)
class RigState:
    prefix: str
    clusters: tuple[ClusterRecord, ...] = ()
    pods: tuple[PodRecord, ...] = ()
    processes: tuple[ProcessRecord, ...] = ()
    # cluster name -> the pod index the next pod gets (indexes are never reused).
    next_pod_index: Mapping[str, int] = field(default_factory=lambda: _frozen_counters({}))
    created: tuple[Created, ...] = ()

    def __post_init__(self) -> None:
        # Callers may pass a plain dict; keep the value immutable like the rest.
        if not isinstance(self.next_pod_index, MappingProxyType):
            object.__setattr__(self, "next_pod_index", _frozen_counters(self.next_pod_index))

    def cluster(self, name: str) -> ClusterRecord | None:
        return next((c for c in self.clusters if c.name == name), None)

    def plan(self, name: str) -> topology.ClusterPlan:
        """The address plan of cluster `name` (with the pod network it was created with)."""
        c = self.cluster(name)
        if c is None:
            raise StateError(f"cluster {name!r} is not in the rig (have: {_names(self)})")
        return topology.cluster(self.prefix, c.index, c.net)

    def pod(self, cluster: str, name: str) -> PodRecord | None:
        return next((p for p in self.pods if p.cluster == cluster and p.name == name), None)

    def process(self, name: str) -> ProcessRecord | None:
        return next((p for p in self.processes if p.name == name), None)


# --- pure updates -------------------------------------------------------------------------


def with_cluster(state: RigState, plan: topology.ClusterPlan) -> RigState:
    if state.cluster(plan.name) is not None:
        raise StateError(f"cluster {plan.name!r} is already in the rig state")
    record = ClusterRecord(
        plan.name, plan.index, plan.netns, plan.wan_ip, plan.pod_subnet, plan.pod_net
    )
    return replace(state, clusters=(*state.clusters, record))


def allocate_pod(state: RigState, cluster: str, name: str) -> tuple[RigState, topology.PodPlan]:
    """Reserve the next pod index (and so address) of `cluster` for a new pod `name`."""
    c = state.cluster(cluster)
    if c is None:
        raise StateError(f"cluster {cluster!r} is not in the rig (have: {_names(state)})")
    if state.pod(cluster, name) is not None:
        raise StateError(f"pod {name!r} already exists in cluster {cluster!r}")
    index = state.next_pod_index.get(cluster, 0)
    plan = topology.pod(state.prefix, c.index, index, name, c.net)
    counters = {**state.next_pod_index, cluster: index + 1}
    return replace(state, next_pod_index=counters), plan


def with_pod(
    state: RigState, plan: topology.PodPlan, namespace: str, service_account: str
) -> RigState:
    record = PodRecord(
        cluster=plan.cluster,
        name=plan.name,
        namespace=namespace,
        service_account=service_account,
        netns=plan.netns,
        ip=plan.ip,
        veth=plan.veth,
        index=plan.index,
    )
    return replace(state, pods=(*state.pods, record))


def without_pod(state: RigState, cluster: str, name: str) -> RigState:
    return replace(
        state, pods=tuple(p for p in state.pods if not (p.cluster == cluster and p.name == name))
    )


def with_process(state: RigState, record: ProcessRecord) -> RigState:
    if state.process(record.name) is not None:
        raise StateError(f"a process named {record.name!r} is already recorded")
    return replace(state, processes=(*state.processes, record))


def with_restarted(state: RigState, old_pid: int, record: ProcessRecord) -> RigState:
    """`record` replaces the dead process `old_pid` (same name), one restart more."""
    return replace(
        state,
        processes=tuple(
            replace(record, restarts=p.restarts + 1) if p.pid == old_pid else p
            for p in state.processes
        ),
    )


def without_process(state: RigState, pid: int) -> RigState:
    return replace(state, processes=tuple(p for p in state.processes if p.pid != pid))


def with_created(state: RigState, kind: str, name: str) -> RigState:
    item = Created(kind, name)
    if item in state.created:
        return state
    return replace(state, created=(*state.created, item))


def without_created(state: RigState, kind: str, name: str) -> RigState:
    return replace(state, created=tuple(c for c in state.created if c != Created(kind, name)))


def _names(state: RigState) -> str:
    return ", ".join(c.name for c in state.clusters) or "none"


# --- serialisation ------------------------------------------------------------------------


def to_dict(state: RigState) -> dict[str, Any]:
    return {
        "version": FORMAT_VERSION,
        "prefix": state.prefix,
        "clusters": [
            {
                "name": c.name,
                "index": c.index,
                "netns": c.netns,
                "wan_ip": c.wan_ip,
                "pod_subnet": c.pod_subnet,
                "pod_net": c.net,
            }
            for c in state.clusters
        ],
        "pods": [
            {
                "cluster": p.cluster,
                "name": p.name,
                "namespace": p.namespace,
                "service_account": p.service_account,
                "netns": p.netns,
                "ip": p.ip,
                "veth": p.veth,
                "index": p.index,
            }
            for p in state.pods
        ],
        "processes": [
            {
                "name": p.name,
                "pid": p.pid,
                "netns": p.netns,
                "argv": list(p.argv),
                "log_path": p.log_path,
                "start_ticks": p.start_ticks,
                "restarts": p.restarts,
            }
            for p in state.processes
        ],
        "next_pod_index": dict(state.next_pod_index),
        "created": [{"kind": c.kind, "name": c.name} for c in state.created],
    }


def to_json(state: RigState) -> str:
    return json.dumps(to_dict(state), indent=2) + "\n"


class _Fields:
    """Typed access to one JSON object, with errors naming the field's path."""

    def __init__(self, value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise StateError(f"{path}: expected an object, got {type(value).__name__}")
        self._d: dict[str, object] = value
        self._path = path

    def _get(self, key: str) -> object:
        if key not in self._d:
            raise StateError(f"{self._path}.{key}: missing")
        return self._d[key]

    def text(self, key: str) -> str:
        v = self._get(key)
        if not isinstance(v, str):
            raise StateError(f"{self._path}.{key}: expected a string, got {type(v).__name__}")
        return v

    def integer(self, key: str, *, optional: bool = False) -> int | None:
        if optional and self._d.get(key) is None:
            return None
        v = self._get(key)
        if not isinstance(v, int) or isinstance(v, bool):
            raise StateError(f"{self._path}.{key}: expected an integer, got {type(v).__name__}")
        return v

    def req_int(self, key: str) -> int:
        v = self.integer(key)
        assert v is not None  # integer() without optional never returns None
        return v

    def array(self, key: str) -> list[object]:
        v = self._get(key)
        if not isinstance(v, list):
            raise StateError(f"{self._path}.{key}: expected a list, got {type(v).__name__}")
        return v

    def objects(self, key: str) -> list[_Fields]:
        return [_Fields(item, f"{self._path}.{key}[{i}]") for i, item in enumerate(self.array(key))]

    def str_list(self, key: str) -> tuple[str, ...]:
        items = self.array(key)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise StateError(f"{self._path}.{key}[{i}]: expected a string")
        return tuple(str(item) for item in items)

    def counters(self, key: str) -> dict[str, int]:
        v = self._get(key)
        if not isinstance(v, dict):
            raise StateError(f"{self._path}.{key}: expected an object, got {type(v).__name__}")
        out: dict[str, int] = {}
        for k, n in v.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise StateError(f"{self._path}.{key}.{k}: expected a non-negative integer")
            out[k] = n
        return out


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def from_dict(data: object) -> RigState:
    top = _Fields(data, "state")
    version = top.req_int("version")
    if version != FORMAT_VERSION:
        raise StateError(f"state.version: {version} is not the supported {FORMAT_VERSION}")
    return RigState(
        prefix=top.text("prefix"),
        clusters=tuple(
            ClusterRecord(
                name=c.text("name"),
                index=c.req_int("index"),
                netns=c.text("netns"),
                wan_ip=c.text("wan_ip"),
                pod_subnet=c.text("pod_subnet"),
                pod_net=_or(c.integer("pod_net", optional=True), -1),
            )
            for c in top.objects("clusters")
        ),
        pods=tuple(
            PodRecord(
                cluster=p.text("cluster"),
                name=p.text("name"),
                namespace=p.text("namespace"),
                service_account=p.text("service_account"),
                netns=p.text("netns"),
                ip=p.text("ip"),
                veth=p.text("veth"),
                index=p.req_int("index"),
            )
            for p in top.objects("pods")
        ),
        processes=tuple(
            ProcessRecord(
                name=p.text("name"),
                pid=p.req_int("pid"),
                netns=p.text("netns"),
                argv=p.str_list("argv"),
                log_path=p.text("log_path"),
                start_ticks=p.integer("start_ticks", optional=True),
                restarts=p.integer("restarts", optional=True) or 0,
            )
            for p in top.objects("processes")
        ),
        next_pod_index=top.counters("next_pod_index"),
        created=tuple(Created(c.text("kind"), c.text("name")) for c in top.objects("created")),
    )


def from_json(text: str) -> RigState:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise StateError(f"state is not valid JSON: {e}") from e
    return from_dict(data)


# --- the file -----------------------------------------------------------------------------


def state_file(rigdir: Path) -> Path:
    return rigdir / STATE_FILE_NAME


def load(path: Path) -> RigState | None:
    """The state in `path`, or None when there is no state file (no rig, or after `down`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"cannot read rig state {path}: {e}") from e
    try:
        return from_json(text)
    except StateError as e:
        raise StateError(f"{path}: {e}") from e


def save(path: Path, state: RigState) -> None:
    atomic_write(path, to_json(state))


def update(path: Path, change: Callable[[RigState], RigState]) -> RigState:
    """Apply `change` to the state in `path` under a lock and save it atomically."""
    with locked(path):
        current = load(path)
        if current is None:
            raise StateError(f"no rig state at {path} (is the rig up?)")
        new = change(current)
        if new != current:
            save(path, new)
        return new
