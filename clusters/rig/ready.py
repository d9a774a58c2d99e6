"""When the rig is ready: what `fedgate rig up` waits for before it returns.

- a pod is ready when its sidecar is (identity and config) and, for a pod that backs a
  service, its workload's port is open; only then is it published as an endpoint
  (`export_ready_pod`, as Kubernetes EndpointSlices list only ready pods);
- every client sidecar routes `echo.demo` to every cluster's endpoint (`wait_routes`);
- a controller replica is the elected leader and every cluster is Live in its view
  (`wait_leader`), read from each replica's `GET /topology.json` inside the control netns.

The second matters because the leader does the writes: a service exported before any leader
exists gets its VIP when one is elected, and `rig up` returning only then means a service
exported in the same second resolves (issue 15). Everything here polls over HTTP inside the
rig's namespaces; nothing is sent from the root namespace.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from clusters import source
from clusters.rig import cmd, control, lifecycle, procs, topology
from clusters.rig.errors import CommandError, RigError

READY_TIMEOUT = 60.0
POLL = 0.2


@dataclass(frozen=True, slots=True)
class Leadership:
    leader: str  # the replica's name ("controller", "controller-1", ...)
    clusters: dict[str, str]  # cluster -> liveness state in the leader's view


def _get(netns: str, url: str) -> dict[str, object]:
    out = cmd.run_in(netns, ["curl", "-sS", "--noproxy", "*", "--max-time", "2", url], timeout=5)
    data = json.loads(out)
    if not isinstance(data, dict):
        raise ValueError(f"{url}: not a JSON object")
    return data


def leadership(rigdir: Path) -> Leadership | None:
    """The leader replica and its view of cluster liveness, or None while no replica leads."""
    state = lifecycle.load(rigdir)
    plan = control.load(rigdir, state.prefix)
    for replica in plan.controllers:
        try:
            data = _get(plan.netns, f"http://{replica.admin}/topology.json")
        except (CommandError, ValueError):
            continue  # not serving yet, or gone: another replica may lead
        if data.get("leader") is True:
            views = data.get("clusters")
            states = {
                str(c.get("name")): str(c.get("state"))
                for c in (views if isinstance(views, list) else [])
                if isinstance(c, dict)
            }
            return Leadership(str(data.get("replica") or replica.process), states)
    return None


def wait_leader(rigdir: Path, timeout: float = READY_TIMEOUT) -> Leadership:
    """Wait until a replica leads and sees every cluster of the rig Live."""
    names = {c.name for c in lifecycle.load(rigdir).clusters}
    deadline = time.monotonic() + timeout
    while True:
        seen = leadership(rigdir)
        if seen is not None and all(seen.clusters.get(n) == "Live" for n in names):
            return seen
        if time.monotonic() > deadline:
            what = (
                "no controller replica is the leader"
                if seen is None
                else f"leader {seen.leader} sees clusters {seen.clusters}"
            )
            want = f"want {', '.join(sorted(names))} Live"
            raise RigError(f"rig not ready after {timeout:.0f} s: {what} ({want})")
        time.sleep(POLL)


def wait_http(netns: str, url: str, rigdir: Path, name: str) -> None:
    """Wait for a 2xx from `url` in `netns`; fail early if rig process `name` exits."""
    record = lifecycle.load(rigdir).process(name)
    procs.wait_http_ok(
        netns,
        url,
        READY_TIMEOUT,
        log_path=lifecycle.log_path(rigdir, name),
        pid=record.pid if record else None,
    )


def _pending_exports(rigdir: Path) -> Path:
    return rigdir / "pending-exports.json"


def add_pending(rigdir: Path, cluster: str, pod: str, ns: str, svc: str, port: int) -> None:
    """Pod `cluster/pod` backs `svc.ns` once its workload listens on `port`."""
    entry = {f"{cluster}/{pod}": [ns, svc, port]}
    _pending_exports(rigdir).write_text(json.dumps({**_read_pending(rigdir), **entry}))


def _read_pending(rigdir: Path) -> dict[str, list[object]]:
    try:
        data: dict[str, list[object]] = json.loads(_pending_exports(rigdir).read_text())
    except FileNotFoundError:
        return {}
    return data


def wait_pod_ready(rigdir: Path, cluster: str, pod: str) -> None:
    """Sidecar ready (identity + config) and, for exported pods, the workload port open."""
    record = lifecycle.load(rigdir).pod(cluster, pod)
    if record is None:
        raise RigError(f"no pod {cluster}/{pod}")
    wait_http(
        record.netns,
        f"http://127.0.0.1:{topology.SIDECAR_ADMIN_PORT}/readyz",
        rigdir,
        f"{cluster}-{pod}-sidecar",
    )
    pending = _read_pending(rigdir).get(f"{cluster}/{pod}")
    if pending is not None:
        wl = lifecycle.load(rigdir).process(f"{cluster}-{pod}")
        procs.wait_tcp(
            record.netns,
            "127.0.0.1",
            int(str(pending[2])),
            READY_TIMEOUT,
            log_path=lifecycle.log_path(rigdir, f"{cluster}-{pod}"),
            pid=wl.pid if wl else None,
        )


def export_ready_pod(rigdir: Path, cluster: str, pod: str) -> None:
    """Publish the pod as an endpoint only once it is ready, as Kubernetes EndpointSlices do."""
    pending = _read_pending(rigdir)
    entry = pending.pop(f"{cluster}/{pod}", None)
    if entry is None:
        return
    record = lifecycle.load(rigdir).pod(cluster, pod)
    assert record is not None
    ns, svc = str(entry[0]), str(entry[1])
    source.add_endpoint(
        source.exports_path(rigdir, cluster), ns, svc, pod, record.ip, record.service_account
    )
    _pending_exports(rigdir).write_text(json.dumps(pending))


def sidecar_config(rigdir: Path, cluster: str, pod: str) -> dict[str, object]:
    """The running config a pod's sidecar reports on its admin port."""
    record = lifecycle.load(rigdir).pod(cluster, pod)
    if record is None:
        raise RigError(f"no pod {cluster}/{pod}")
    url = f"http://127.0.0.1:{topology.SIDECAR_ADMIN_PORT}/config"
    out = cmd.run_in(record.netns, ["curl", "-sS", "--noproxy", "*", "--max-time", "2", url])
    data: dict[str, object] = json.loads(out)
    return data


def service_seen(config: dict[str, object], name: str, namespace: str) -> dict[str, object]:
    """The sidecar's snapshot entry of `name.namespace` ({} if it has none)."""
    snap = config.get("snapshot")
    if not isinstance(snap, dict):
        return {}
    for svc in snap.get("services", []):
        if svc.get("name") == name and svc.get("namespace") == namespace:
            return dict(svc)
    return {}


def endpoints_seen(config: dict[str, object], name: str, namespace: str) -> list[dict[str, str]]:
    endpoints = service_seen(config, name, namespace).get("endpoints")
    return list(endpoints) if isinstance(endpoints, list) else []


def wait_routes(
    rigdir: Path, name: str, namespace: str, expected: int, timeout: float = READY_TIMEOUT
) -> None:
    """Wait until every client sidecar routes `name.namespace` to `expected` endpoints, and
    (with any) resolves its name: the VIP may come in a later config than the endpoints (the
    leader allocates it), and until then the name is NXDOMAIN."""
    state = lifecycle.load(rigdir)
    deadline = time.monotonic() + timeout
    for c in state.clusters:
        while True:
            svc = service_seen(sidecar_config(rigdir, c.name, "client"), name, namespace)
            endpoints = svc.get("endpoints")
            seen = len(endpoints) if isinstance(endpoints, list) else 0
            if seen == expected and (expected == 0 or svc.get("vip")):
                break
            if time.monotonic() > deadline:
                raise RigError(
                    f"{c.name}/client sees {seen} endpoints of {name}.{namespace}, "
                    f"expected {expected} within {timeout:.0f} s"
                )
            time.sleep(POLL)
