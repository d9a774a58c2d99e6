"""Rig lifecycle: the operations behind `fedgate rig up/add-pod/remove-pod/down`.

Each operation combines the netns plumbing, the state file and the per-cluster source files:
`up` builds the WAN, the control netns and N clusters and writes fresh (empty) exports.json and
tokens.json per cluster; `add_pod` allocates the next address and builds the pod; `start_process`
runs a command in a netns with its log under `<rigdir>/logs/`; `down` stops recorded processes
and sweeps every namespace of the prefix, state file or not.

This module does not know which fedgate processes make up a rig (etcd, controller, agents,
gateways, sidecars): the CLI builds their argv from `fedgate_cmd` and calls `start_process`.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from ca.files import locked
from clusters import source
from clusters.rig import netns, procs, supervisor, topology
from clusters.rig import state as rigstate
from clusters.rig.errors import RigError, StateError


def logs_dir(rigdir: Path) -> Path:
    return rigdir / "logs"


def log_path(rigdir: Path, process_name: str) -> Path:
    return logs_dir(rigdir) / f"{process_name}.log"


def etcd_data_dir(rigdir: Path, member: str) -> Path:
    """Where etcd member `member` ("etcd", "etcd-1", ...) keeps its data; `down` removes it."""
    return rigdir / "etcd-data" / member


def load(rigdir: Path) -> rigstate.RigState:
    """The state of the rig at `rigdir`; `RigError` if no rig is up there."""
    current = rigstate.load(rigstate.state_file(rigdir))
    if current is None:
        raise RigError(f"no rig at {rigdir} (run `fedgate rig up` first)")
    return current


def up(
    rigdir: Path,
    clusters: int,
    prefix: str = topology.DEFAULT_PREFIX,
    pod_cidr_overlap: bool = False,
) -> rigstate.RigState:
    """Create the WAN, the control netns and `clusters` clusters; return the saved state.

    `pod_cidr_overlap`: north gets west's pod subnet (`topology.pod_net`).

    Refuses to run over an existing rig (state file or `<prefix>-*` namespaces): run `down`
    first. On failure, everything created so far is swept away before the error propagates.
    """
    topology.check_prefix(prefix)
    names = topology.cluster_names(clusters)
    path = rigstate.state_file(rigdir)
    if path.exists():
        raise RigError(f"a rig state already exists at {path}; run `fedgate rig down` first")
    stale = [n for n in netns.list_netns() if n.startswith(topology.netns_names_prefix(prefix))]
    if stale:
        raise RigError(f"namespaces {', '.join(stale)} already exist; run `fedgate rig down` first")
    current = rigstate.RigState(prefix=prefix)
    try:
        current = rigstate.with_created(current, "netns", netns.create_wan(prefix))
        current = rigstate.with_created(current, "netns", netns.create_control(prefix).netns)
        for index, name in enumerate(names):
            plan = netns.create_cluster(prefix, index, topology.pod_net(index, pod_cidr_overlap))
            current = rigstate.with_created(current, "netns", plan.netns)
            current = rigstate.with_cluster(current, plan)
            # Fresh files: a previous rig's endpoints and tokens must not leak into this one.
            source.write_exports(source.exports_path(rigdir, name), ())
            source.write_tokens(source.tokens_path(rigdir, name), {})
        rigstate.save(path, current)
    except BaseException:
        netns.delete_all(prefix)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    return current


def add_pod(
    rigdir: Path,
    cluster: str,
    name: str,
    namespace: str = "default",
    service_account: str = "default",
) -> rigstate.PodRecord:
    """Create pod `name` in `cluster` at the cluster's next unused address."""
    path = rigstate.state_file(rigdir)
    with locked(path):
        current = load(rigdir)
        current, plan = rigstate.allocate_pod(current, cluster, name)
        # Save the spent index before creating, so even a failed attempt never reuses it.
        rigstate.save(path, current)
        try:
            net = current.plan(cluster).pod_net
            netns.create_pod(current.prefix, plan.cluster_index, plan.index, name, net)
        except BaseException:
            netns.delete(plan.netns)
            raise
        current = rigstate.with_created(current, "netns", plan.netns)
        current = rigstate.with_pod(current, plan, namespace, service_account)
        rigstate.save(path, current)
    record = current.pod(cluster, name)
    assert record is not None  # just added under the lock
    return record


def remove_pod(rigdir: Path, cluster: str, name: str) -> None:
    """Stop the pod's processes, delete its netns and drop its endpoints from exports.json."""
    path = rigstate.state_file(rigdir)
    current = load(rigdir)
    pod = current.pod(cluster, name)
    if pod is None:
        raise StateError(f"no pod {name!r} in cluster {cluster!r}")
    for p in current.processes:
        if p.netns == pod.netns:
            procs.stop(p.pid, state_file=path)
    netns.delete(pod.netns)
    rigstate.update(
        path,
        lambda s: rigstate.without_created(
            rigstate.without_pod(s, cluster, name), "netns", pod.netns
        ),
    )
    source.remove_pod(source.exports_path(rigdir, cluster), name)


def start_process(
    rigdir: Path,
    name: str,
    netns_name: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
) -> rigstate.ProcessRecord:
    """Start `argv` in `netns_name`, logging to `<rigdir>/logs/<name>.log`, and record it."""
    path = rigstate.state_file(rigdir)
    procs.start(name, netns_name, argv, log_path(rigdir, name), env, state_file=path)
    record = load(rigdir).process(name)
    assert record is not None  # procs.start recorded it
    return record


def stop_process(rigdir: Path, name: str) -> bool:
    """Stop the recorded process `name`; True if it was running."""
    record = load(rigdir).process(name)
    if record is None:
        raise StateError(f"no process named {name!r} in the rig")
    return procs.stop(record.pid, state_file=rigstate.state_file(rigdir))


def down(rigdir: Path, prefix: str | None = None) -> list[str]:
    """Stop every process and delete every namespace of the rig; return the namespaces removed.

    The prefix comes from the state file, or `prefix` (default "fg") when the state is missing
    or unreadable: after a crash `down` still cleans up. Logs are kept for post-mortems; etcd's
    data goes (a new rig must not start from the old one's keys, leases and revisions).
    """
    path = rigstate.state_file(rigdir)
    supervisor.stop(rigdir)  # first: nothing may be restarted while the rig goes down
    try:
        current = rigstate.load(path)
    except StateError:
        current = None
    if current is not None:
        if prefix is not None and prefix != current.prefix:
            raise RigError(f"the rig at {rigdir} has prefix {current.prefix!r}, not {prefix!r}")
        prefix = current.prefix
        # All at once (one shared grace period), and only pids that are still ours.
        procs.terminate([p.pid for p in current.processes if procs.owned(p)])
    removed = netns.delete_all(prefix or topology.DEFAULT_PREFIX)
    procs.reap()  # processes of the rig that died and were restarted by the supervisor
    shutil.rmtree(etcd_data_dir(rigdir, "etcd").parent, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return removed
