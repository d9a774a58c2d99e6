"""What `fedgate manifests` renders for one cluster: parsed once, checked, frozen.

Names, ports and mount paths shared by several objects live here too, so the Service, the
container's listen flags and the probes cannot drift apart.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from mesh.errors import InvalidNameError
from mesh.naming import SYSTEM_NAMESPACE, check_label, gateway_identity, trust_domain_for

NAMESPACE = SYSTEM_NAMESPACE
DEFAULT_IMAGE = "fedgate:0.1.0"  # not :latest, so kind's loaded image is used (IfNotPresent)
DEFAULT_ETCD_IMAGE = "quay.io/coreos/etcd:v3.5.21"
ROLES = ("member", "management")
SERVICE_TYPES = ("LoadBalancer", "NodePort")
TRANSPORTS = ("tls", "quic", "passthrough")

# Ports: the rig's (clusters/rig/topology.py), so docs and dashboards hold for both.
TUNNEL_PORT = 15443  # TCP (tls, passthrough) and UDP (quic)
EGRESS_PORT = 15008
CA_PORT = 15013
CA_RENEW_PORT = 15014  # --ca-listen's port + 1, the CA's default
GATEWAY_METRICS_PORT = 15020
GATEWAY_ADMIN_PORT = 15021
AGENT_ADMIN_PORT = 15022
WEBHOOK_PORT = 15017  # the agent's injection webhook (HTTPS); its Service answers on 443
CONTROLLER_GRPC_PORT = 15012
CONTROLLER_ADMIN_PORT = 15014
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
ETCD_METRICS_PORT = 2381
ETCD_MEMBERS = 3

# Object names.
AGENT = "fedgate-agent"
GATEWAY = "fedgate-gateway"
GATEWAY_EGRESS = "fedgate-gateway-egress"
# The gateway's identity is fixed (mesh.naming): spiffe://<td>/ns/fedgate-system/sa/gateway, and
# the CA issues the SVID of the ServiceAccount the projected token belongs to.
GATEWAY_SERVICE_ACCOUNT = gateway_identity("fedgate.local").service_account
CA_SERVICE = "fedgate-ca"
CONTROLLER = "fedgate-controller"
CONTROL_SERVICE = "fedgate-control"  # the management cluster's address for member clusters
ETCD = "fedgate-etcd"
ETCD_CLIENT_SERVICE = "fedgate-etcd-client"
ETCD_PROVISION = "fedgate-etcd-provision"

# Secrets and ConfigMaps the operator creates (docs/kubernetes.md); never rendered.
CA_SECRET = "fedgate-ca"  # the cluster CA directory (`fedgate ca init`)
CONTROL_CA_SECRET = "fedgate-control-ca"  # the control plane's CA directory
BOOTSTRAP_CONFIGMAP = "fedgate-bootstrap"  # ca.pem, control.pem, trust-domain
INJECT_CONFIGMAP = "fedgate-inject"  # the injector's settings (rendered: nothing secret)
ETCD_CLIENT_SECRET = "fedgate-etcd-client"  # ca.crt and this cluster's agent password
ETCD_SERVER_SECRET = "fedgate-etcd-server-tls"  # kubernetes.io/tls + ca.crt
ETCD_PEER_SECRET = "fedgate-etcd-peer-tls"  # kubernetes.io/tls + ca.crt
ETCD_USERS_SECRET = "fedgate-etcd-users"  # one key per etcd user: its password
# The name every etcd client verifies in the server certificate, whatever address it dials
# (a member cluster reaches etcd through a load balancer's IP or a node port).
ETCD_SERVER_NAME = f"{ETCD}.{NAMESPACE}.svc"

# Node ports of the NodePort variant (kind): in the default 30000-32767 range.
GATEWAY_NODE_PORT = 31443
CONTROLLER_NODE_PORT = 31012
ETCD_NODE_PORT = 32379


class ManifestError(ValueError):
    """The settings cannot give a working install; the message names the option."""


def in_cluster(name: str, port: int) -> str:
    return f"{name}.{NAMESPACE}.svc:{port}"


def etcd_member(index: int) -> str:
    return f"{ETCD}-{index}"


def etcd_member_host(index: int) -> str:
    return f"{etcd_member(index)}.{ETCD}.{NAMESPACE}.svc"


@dataclass(frozen=True, slots=True)
class ManifestSettings:
    """One cluster's install. `management` adds the controller and etcd to a member's objects
    (as Istio's primary cluster is also a member of its mesh)."""

    cluster: str
    gateway_address: str  # host:port peers dial: the load balancer's (or a node's) address
    role: str = "member"
    image: str = DEFAULT_IMAGE
    gateway_service: str = "LoadBalancer"
    transport: str = "tls"
    # Where this cluster reaches the management cluster; "" on the management cluster means
    # its in-cluster Services.
    etcd: str = ""
    controller: str = ""
    # The clusters whose etcd users the management cluster's provisioning Job creates.
    clusters: tuple[str, ...] = field(default_factory=tuple)
    etcd_image: str = DEFAULT_ETCD_IMAGE
    # The cluster CA's root(s), PEM: the injection webhook's caBundle. Public; None leaves it
    # to the installer (the API server cannot call the webhook until it is set).
    ca_bundle: bytes | None = None
    # kube-dns's Service IP: injected pods' second nameserver (it differs between clusters
    # with different service subnets).
    cluster_dns: str = "10.96.0.10"

    def __post_init__(self) -> None:
        try:
            check_label(self.cluster, "cluster name")
            for name in self.clusters:
                check_label(name, "cluster name")
        except InvalidNameError as e:
            raise ManifestError(str(e)) from e
        _choice("--role", self.role, ROLES)
        _choice("--gateway-service", self.gateway_service, SERVICE_TYPES)
        _choice("--transport", self.transport, TRANSPORTS)
        _hostport("--gateway-address", self.gateway_address)
        if self.role == "member":
            for option, value in (("--etcd", self.etcd), ("--controller", self.controller)):
                if not value:
                    raise ManifestError(
                        f"a member cluster needs {option} (the management cluster's address)"
                    )
        try:
            ipaddress.ip_address(self.cluster_dns)
        except ValueError as e:
            raise ManifestError(f"--cluster-dns: {self.cluster_dns!r} is not an IP address") from e
        for endpoint in filter(None, self.etcd.split(",")):
            _hostport("--etcd", endpoint)
        for endpoint in filter(None, self.controller.split(",")):
            _hostport("--controller", endpoint)
        if self.role == "management" and self.cluster not in self.clusters:
            # The management cluster is a member too: its own agent needs its etcd user.
            object.__setattr__(self, "clusters", (self.cluster, *self.clusters))

    @property
    def trust_domain(self) -> str:
        return trust_domain_for(self.cluster)

    @property
    def management(self) -> bool:
        return self.role == "management"

    @property
    def etcd_endpoints(self) -> str:
        # In the management cluster: the client Service's stable ClusterIP, not the members'
        # names. federation.etcd resolves names once, at connect, and a member's pod IP
        # changes when it is rescheduled; the Service's address does not.
        return self.etcd or in_cluster(ETCD_CLIENT_SERVICE, ETCD_CLIENT_PORT)

    @property
    def controller_address(self) -> str:
        return self.controller or in_cluster(CONTROLLER, CONTROLLER_GRPC_PORT)

    @property
    def node_ports(self) -> bool:
        return self.gateway_service == "NodePort"


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ManifestError(f"{option} must be one of {', '.join(allowed)}, not {value!r}")


def _hostport(option: str, text: str) -> None:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ManifestError(f"{option}: {text!r} is not host:port")


def etcd_client_args(endpoints: str, user: str, directory: str) -> list[str]:
    """The `fedgate agent|controller` etcd flags: TLS to the management cluster's etcd, as
    `user` (a role of `federation.etcd_auth`), from a mounted `ca.crt` and `password`."""
    return [
        f"--etcd={endpoints}",
        f"--etcd-ca={directory}/ca.crt",
        f"--etcd-server-name={ETCD_SERVER_NAME}",
        f"--etcd-user={user}",
        f"--etcd-password-file={directory}/password",
    ]
