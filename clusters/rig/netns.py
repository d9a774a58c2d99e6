"""Network-namespace plumbing of the rig: create the WAN, control, cluster and pod namespaces,
and sweep them all away.

Every veth pair is created directly between two rig namespaces (`ip -n A link add X type veth
peer name Y netns B`), so nothing ever appears in the root namespace and interface names only
need to be unique inside their own namespace. Addresses come from topology.py. Commands fail
loudly (`CommandError` names the command and quotes stderr).

`delete_all` is the cleanup of record: it sweeps by name prefix (`ip netns list`), so it works
with a missing or stale state file and is idempotent. This module does not touch the state file
and starts no long-running process.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from clusters.rig import procs, topology
from clusters.rig.cmd import IP, IPTABLES, SYSCTL, run, run_in
from clusters.rig.errors import CommandError

ETC_NETNS = Path("/etc/netns")


def list_netns() -> list[str]:
    """Names of all network namespaces (`ip netns list` prints "name (id: N)" per line)."""
    return [line.split()[0] for line in run([IP, "netns", "list"]).splitlines() if line.strip()]


def exists(netns: str) -> bool:
    return netns in list_netns()


def pids(netns: str) -> list[int]:
    """Pids of the processes whose network namespace is `netns`."""
    try:
        out = run([IP, "netns", "pids", netns])
    except CommandError:
        if not exists(netns):
            return []
        raise
    return [int(tok) for tok in out.split() if tok.isdigit()]


def _ip(netns: str, *args: str) -> None:
    """`ip -n NETNS args...`: configure a namespace without entering it."""
    run([IP, "-n", netns, *args])


def _add_netns(netns: str) -> None:
    run([IP, "netns", "add", netns])
    _ip(netns, "link", "set", "lo", "up")


def _veth(netns: str, name: str, peer_netns: str, peer_name: str) -> None:
    _ip(netns, "link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", peer_netns)


def create_wan(prefix: str) -> str:
    """The WAN namespace with its bridge (no address: it only switches). Returns its name."""
    netns = topology.wan_netns(prefix)
    _add_netns(netns)
    _ip(netns, "link", "add", topology.WAN_BRIDGE, "type", "bridge")
    _ip(netns, "link", "set", topology.WAN_BRIDGE, "up")
    return netns


def _attach_to_wan(prefix: str, netns: str, peer: str, address: str) -> None:
    wan = topology.wan_netns(prefix)
    _veth(netns, topology.WAN_INTERFACE, wan, peer)
    _ip(wan, "link", "set", peer, "master", topology.WAN_BRIDGE, "up")
    cidr = f"{address}/{topology.WAN_PREFIXLEN}"
    _ip(netns, "addr", "add", cidr, "dev", topology.WAN_INTERFACE)
    _ip(netns, "link", "set", topology.WAN_INTERFACE, "up")


def create_control(prefix: str) -> topology.ControlPlan:
    """The control-plane namespace on the WAN (etcd and controllers bind its address)."""
    plan = topology.control(prefix)
    _add_netns(plan.netns)
    _attach_to_wan(prefix, plan.netns, plan.wan_peer, plan.ip)
    # No default route: pods reach it masqueraded as their cluster's WAN address.
    return plan


def create_cluster(prefix: str, index: int, net: int | None = None) -> topology.ClusterPlan:
    """A cluster namespace: WAN leg, pod bridge, forwarding and NAT from pods to the WAN.

    There is deliberately no route to any other cluster's pod subnet (and no default route):
    clusters meet only through their gateways' WAN addresses.
    """
    plan = topology.cluster(prefix, index, net)
    _add_netns(plan.netns)
    _attach_to_wan(prefix, plan.netns, plan.wan_peer, plan.wan_ip)
    _ip(plan.netns, "link", "add", topology.POD_BRIDGE, "type", "bridge")
    cidr = f"{plan.pod_gateway}/{topology.POD_PREFIXLEN}"
    _ip(plan.netns, "addr", "add", cidr, "dev", topology.POD_BRIDGE)
    _ip(plan.netns, "link", "set", topology.POD_BRIDGE, "up")
    # sysctl and iptables act on the namespace they run in, so they go through `ip netns exec`.
    run_in(plan.netns, [SYSCTL, "-q", "-w", "net.ipv4.ip_forward=1"])
    nat = ["-t", "nat", "-A", "POSTROUTING", "-s", plan.pod_subnet, "-o", topology.WAN_INTERFACE]
    run_in(plan.netns, [IPTABLES, *nat, "-j", "MASQUERADE"])
    return plan


def create_pod(
    prefix: str, cluster_index: int, pod_index: int, name: str, net: int | None = None
) -> topology.PodPlan:
    """A pod namespace on its cluster's pod bridge, with resolv.conf pointing at the sidecar."""
    plan = topology.pod(prefix, cluster_index, pod_index, name, net)
    cluster_ns = topology.cluster(prefix, cluster_index).netns
    _add_netns(plan.netns)
    _veth(plan.netns, topology.POD_INTERFACE, cluster_ns, plan.veth)
    _ip(cluster_ns, "link", "set", plan.veth, "master", topology.POD_BRIDGE, "up")
    cidr = f"{plan.ip}/{topology.POD_PREFIXLEN}"
    _ip(plan.netns, "addr", "add", cidr, "dev", topology.POD_INTERFACE)
    _ip(plan.netns, "link", "set", topology.POD_INTERFACE, "up")
    _ip(plan.netns, "route", "add", "default", "via", plan.gateway)
    # `ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf.
    etc = ETC_NETNS / plan.netns
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text(f"nameserver {topology.POD_NAMESERVER}\n", encoding="utf-8")
    return plan


def delete(netns: str, *, timeout: float = procs.STOP_TIMEOUT) -> None:
    """Kill every process in `netns`, delete it and its /etc/netns dir. Idempotent."""
    procs.terminate(pids(netns), timeout)
    if exists(netns):
        run([IP, "netns", "del", netns])
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(ETC_NETNS / netns)


def delete_all(prefix: str, *, timeout: float = procs.STOP_TIMEOUT) -> list[str]:
    """Remove every netns named `<prefix>-*` and its processes; return the names removed.

    Works from `ip netns list` alone (no state file needed), so it also cleans up after a crash.
    Processes are stopped first in all namespaces at once (SIGTERM, SIGKILL after `timeout`),
    so that deleting a namespace never leaves a process running in a detached network.
    """
    start = topology.netns_names_prefix(prefix)
    names = [n for n in list_netns() if n.startswith(start)]
    procs.terminate([pid for n in names for pid in pids(n)], timeout)
    removed = []
    # Any order works: deleting a namespace destroys its veth ends, peers included.
    for netns in sorted(names):
        if exists(netns):
            run([IP, "netns", "del", netns])
            removed.append(netns)
    if ETC_NETNS.is_dir():
        for etc in ETC_NETNS.iterdir():
            if etc.name.startswith(start):
                shutil.rmtree(etc, ignore_errors=True)
    return removed
