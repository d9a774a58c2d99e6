"""The rig's fixed topology: names, addresses and ports, as pure values.

Every address the rig uses is computed here from (prefix, cluster index, pod index), so the
plumbing (netns.py), the state file and the CLI agree without passing addresses around.

    <prefix>-wan            bridge `wan0`, the shared "WAN" where gateways meet (172.30.0.0/24)
    <prefix>-ctl            control plane: 172.30.0.2 (etcd, controller gRPC and admin)
    <prefix>-<cluster>      cluster i: `wan0` 172.30.0.(10+i)/24, bridge `pods0` 10.(1+i).0.1/24
    <prefix>-<cluster>-<p>  pod k of cluster i: `eth0` 10.(1+i).0.(10+k)/24, default via .1

With `--pod-cidr-overlap`, north (index 2) uses west's pod network (10.2.0.0/24, `pod_net` 1)
instead of its own, as kind-configs/ does: pod addresses are unique only within a cluster, and
nothing outside a cluster may rely on them (gateways route by service name, never by pod IP).

This module does no I/O and runs no command; it only names things.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mesh.errors import InvalidNameError
from mesh.naming import check_label

DEFAULT_PREFIX = "fg"
DEFAULT_RIG_DIR = Path("/run/fedgate-rig")

# A prefix may not contain "-": delete_all sweeps every netns named "<prefix>-*", and a prefix
# "fg-t" would make the sweep of "fg" destroy another rig's namespaces.
_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,7}$")

_FIRST_CLUSTER_NAMES = ("east", "west", "north", "south", "central")
# 10.(1+i).0.0/24 and 172.30.0.(10+i) must stay valid octets; far more than one machine can run.
MAX_CLUSTERS = 200
# Pod addresses are 10.(1+i).0.(10+k), k < MAX_PODS_PER_CLUSTER keeps the last octet <= 254.
MAX_PODS_PER_CLUSTER = 245

WAN_BRIDGE = "wan0"
WAN_PREFIXLEN = 24
WAN_SUBNET = "172.30.0.0/24"
POD_BRIDGE = "pods0"
POD_PREFIXLEN = 24
POD_INTERFACE = "eth0"
# Inside the control netns and each cluster netns the WAN-facing veth end is called wan0 too.
WAN_INTERFACE = "wan0"

CONTROL_IP = "172.30.0.2"
ETCD_PORT = 2379
CONTROLLER_GRPC_PORT = 15012
CONTROLLER_ADMIN_PORT = 15014

TUNNEL_PORT = 15443  # UDP (quic) or TCP (tls, passthrough) on the cluster's WAN address
EGRESS_PORT = 15008  # TCP, HTTP CONNECT from the cluster's sidecars, on the pods0 address
AGENT_CA_PORT = 15013  # the agent's SVID-signing service, on the pods0 address
AGENT_ADMIN_PORT = 15022  # 127.0.0.1 inside the cluster netns
GATEWAY_ADMIN_PORT = 15021  # 127.0.0.1 inside the cluster netns
GATEWAY_METRICS_PORT = 15020  # metrics only, on the cluster's WAN address (controllers scrape)

SIDECAR_ADMIN_PORT = 15000  # 127.0.0.1 inside the pod netns
SIDECAR_OUTBOUND_PORT = 15001
SIDECAR_INBOUND_PORT = 15006
POD_NAMESERVER = "127.0.0.1"  # the sidecar answers DNS there


class TopologyError(ValueError):
    """A prefix, index or name is outside what the rig's address plan supports."""


def check_prefix(prefix: str) -> str:
    if not _PREFIX.match(prefix):
        raise TopologyError(
            f"rig prefix {prefix!r} must be 1-8 lowercase letters/digits, starting with a letter"
            " (no '-': namespaces are swept by '<prefix>-')"
        )
    return prefix


def cluster_names(n: int) -> tuple[str, ...]:
    """east, west, north, south, central, then cluster5, cluster6, ... (index order)."""
    if not 0 <= n <= MAX_CLUSTERS:
        raise TopologyError(f"cluster count {n} is outside 0..{MAX_CLUSTERS}")
    return tuple(cluster_name(i) for i in range(n))


def cluster_name(index: int) -> str:
    if not 0 <= index < MAX_CLUSTERS:
        raise TopologyError(f"cluster index {index} is outside 0..{MAX_CLUSTERS - 1}")
    return _FIRST_CLUSTER_NAMES[index] if index < len(_FIRST_CLUSTER_NAMES) else f"cluster{index}"


# With overlapping pod CIDRs: cluster index -> the index whose pod network it shares.
OVERLAP = {2: 1}


def pod_net(index: int, overlap: bool) -> int:
    """Which cluster's 10.(1+n).0.0/24 pod network cluster `index` uses."""
    return OVERLAP.get(index, index) if overlap else index


def index_of_cluster(name: str) -> int:
    """The inverse of `cluster_name`."""
    if name in _FIRST_CLUSTER_NAMES:
        return _FIRST_CLUSTER_NAMES.index(name)
    digits = name.removeprefix("cluster")
    if digits != name and digits.isdigit() and str(int(digits)) == digits:
        index = int(digits)
        if len(_FIRST_CLUSTER_NAMES) <= index < MAX_CLUSTERS:
            return index
    raise TopologyError(f"{name!r} is not a rig cluster name")


def wan_netns(prefix: str) -> str:
    return f"{check_prefix(prefix)}-wan"


@dataclass(frozen=True, slots=True)
class ControlPlan:
    """The control-plane netns: etcd and the federation controller(s) listen here."""

    netns: str
    ip: str = CONTROL_IP
    # The veth end inside the WAN netns, attached to the bridge.
    wan_peer: str = "vctl"

    @property
    def etcd_endpoint(self) -> str:
        return f"{self.ip}:{ETCD_PORT}"

    @property
    def grpc_address(self) -> str:
        return f"{self.ip}:{CONTROLLER_GRPC_PORT}"

    @property
    def admin_address(self) -> str:
        return f"{self.ip}:{CONTROLLER_ADMIN_PORT}"


def control(prefix: str) -> ControlPlan:
    return ControlPlan(netns=f"{check_prefix(prefix)}-ctl")


@dataclass(frozen=True, slots=True)
class ClusterPlan:
    """One cluster: its netns, WAN address, pod network and the gateway/agent listen addresses."""

    name: str
    index: int
    netns: str
    wan_ip: str
    pod_subnet: str  # 10.(1+n).0.0/24, n = pod_net
    pod_gateway: str  # 10.(1+n).0.1, the pods0 bridge address and the pods' default route
    # The veth end inside the WAN netns; unique there because the index is.
    wan_peer: str
    pod_net: int  # whose pod network this is: the index, unless pod CIDRs overlap

    @property
    def tunnel_address(self) -> tuple[str, int]:
        return (self.wan_ip, TUNNEL_PORT)

    @property
    def egress_address(self) -> tuple[str, int]:
        return (self.pod_gateway, EGRESS_PORT)

    @property
    def agent_ca_address(self) -> tuple[str, int]:
        return (self.pod_gateway, AGENT_CA_PORT)

    @property
    def agent_admin_address(self) -> tuple[str, int]:
        return ("127.0.0.1", AGENT_ADMIN_PORT)

    @property
    def gateway_admin_address(self) -> tuple[str, int]:
        return ("127.0.0.1", GATEWAY_ADMIN_PORT)

    @property
    def gateway_metrics_address(self) -> tuple[str, int]:
        return (self.wan_ip, GATEWAY_METRICS_PORT)


def cluster(prefix: str, index: int, net: int | None = None) -> ClusterPlan:
    """Cluster `index`; `net`: the pod network it uses (`pod_net`; default its own)."""
    name = cluster_name(index)
    net = index if net is None else net
    cluster_name(net)  # range check
    return ClusterPlan(
        name=name,
        index=index,
        netns=f"{check_prefix(prefix)}-{name}",
        wan_ip=f"172.30.0.{10 + index}",
        pod_subnet=f"10.{1 + net}.0.0/{POD_PREFIXLEN}",
        pod_gateway=f"10.{1 + net}.0.1",
        wan_peer=f"vc{index}",
        pod_net=net,
    )


@dataclass(frozen=True, slots=True)
class PodPlan:
    """One pod: its netns, address, and the veth pair joining it to its cluster's pods0 bridge."""

    cluster: str
    cluster_index: int
    name: str
    index: int
    netns: str
    ip: str
    gateway: str
    # The veth end inside the cluster netns (<= 15 chars, unique there because the pod index
    # is never reused within a rig); the end inside the pod is always `eth0`.
    veth: str

    @property
    def sidecar_admin_address(self) -> tuple[str, int]:
        return ("127.0.0.1", SIDECAR_ADMIN_PORT)


def pod(
    prefix: str, cluster_index: int, pod_index: int, name: str, net: int | None = None
) -> PodPlan:
    c = cluster(prefix, cluster_index, net)
    try:
        check_label(name, "pod name")
    except InvalidNameError as e:
        raise TopologyError(str(e)) from e
    if not 0 <= pod_index < MAX_PODS_PER_CLUSTER:
        raise TopologyError(
            f"pod index {pod_index} in cluster {c.name} is outside 0..{MAX_PODS_PER_CLUSTER - 1}"
        )
    return PodPlan(
        cluster=c.name,
        cluster_index=cluster_index,
        name=name,
        index=pod_index,
        netns=f"{c.netns}-{name}",
        ip=f"10.{1 + c.pod_net}.0.{10 + pod_index}",
        gateway=c.pod_gateway,
        veth=f"vp{pod_index}",
    )


def netns_names_prefix(prefix: str) -> str:
    """What every netns of the rig named `prefix` starts with (the delete_all sweep key)."""
    return f"{check_prefix(prefix)}-"
