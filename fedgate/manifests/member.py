"""What every member cluster runs: the agent (catalog publisher, CA, write-back) and the
east-west gateway, with their Services.

The agent runs two replicas (spread over nodes, a PodDisruptionBudget keeps one): both serve
the CA and the webhook (stateless given the CA Secret); the one elected on the Lease
`fedgate-system/fedgate-agent` (`clusters.kube.lease`, its pod name as holder identity) alone
publishes the catalog to etcd and writes ServiceImports back, since two publishers would attach
the cluster's keys to two etcd leases.
"""

from __future__ import annotations

from fedgate.manifests import injector
from fedgate.manifests.common import (
    Obj,
    deployment,
    fedgate_container,
    mount,
    pdb,
    pod_spec,
    port,
    secret_volume,
    service,
    service_port,
)
from fedgate.manifests.rbac import AGENT_LEASE
from fedgate.manifests.settings import (
    AGENT,
    AGENT_ADMIN_PORT,
    BOOTSTRAP_CONFIGMAP,
    CA_PORT,
    CA_RENEW_PORT,
    CA_SECRET,
    CA_SERVICE,
    EGRESS_PORT,
    ETCD_CLIENT_SECRET,
    GATEWAY,
    GATEWAY_ADMIN_PORT,
    GATEWAY_EGRESS,
    GATEWAY_METRICS_PORT,
    GATEWAY_NODE_PORT,
    GATEWAY_SERVICE_ACCOUNT,
    NAMESPACE,
    TUNNEL_PORT,
    ManifestSettings,
    etcd_client_args,
    in_cluster,
)

AGENT_REPLICAS = 2
GATEWAY_REPLICAS = 2
CA_DIR = "/var/run/fedgate/ca"
IDENTITY_DIR = "/var/run/fedgate/identity"
ETCD_DIR = "/var/run/fedgate/etcd"
CONTROL_DIR = "/var/run/fedgate/control"  # the control plane's root, for injected namespaces
TOKEN_AUDIENCE = "fedgate"  # what the agent's TokenReview requires (docs/kubernetes.md)
ANY = "0.0.0.0"


def agent(settings: ManifestSettings) -> list[Obj]:
    args = [
        "agent",
        f"--cluster={settings.cluster}",
        "--source=kubernetes",
        *etcd_client_args(settings.etcd_endpoints, f"agent-{settings.cluster}", ETCD_DIR),
        f"--ca-dir={CA_DIR}",
        f"--ca-listen={ANY}:{CA_PORT}",
        # Published until the gateway Service's load balancer has an address, then followed.
        f"--gateway-tunnel={settings.gateway_address}",
        f"--gateway-service={NAMESPACE}/{GATEWAY}",
        f"--transport={settings.transport}",
        f"--gateway-egress={in_cluster(GATEWAY_EGRESS, EGRESS_PORT)}",
        f"--admin={ANY}:{AGENT_ADMIN_PORT}",
        # Holder identity: the hostname, which is the pod's name.
        f"--leader-elect-lease={NAMESPACE}/{AGENT_LEASE}",
        # Written, with the cluster's roots, into each injected namespace's fedgate-bootstrap.
        f"--control-root={CONTROL_DIR}/control.pem",
        *injector.agent_args(),
    ]
    container = fedgate_container(
        settings,
        "agent",
        args,
        [
            port("grpc-ca", CA_PORT),
            port("grpc-ca-renew", CA_RENEW_PORT),
            port("admin", AGENT_ADMIN_PORT),
            injector.agent_port(),
        ],
        AGENT_ADMIN_PORT,
        [
            mount("ca", CA_DIR),
            mount("etcd", ETCD_DIR),
            mount("control", CONTROL_DIR),
            injector.agent_mount(),
        ],
    )
    spec = pod_spec(
        AGENT,
        AGENT,
        [container],
        [
            secret_volume("ca", CA_SECRET),
            secret_volume("etcd", ETCD_CLIENT_SECRET),
            # fedgate-system's own bootstrap ConfigMap (the install writes it), control.pem only.
            {
                "name": "control",
                "configMap": {
                    "name": BOOTSTRAP_CONFIGMAP,
                    "items": [{"key": "control.pem", "path": "control.pem"}],
                },
            },
            injector.agent_volume(),
        ],
        automount=True,  # the only fedgate pod that talks to the Kubernetes API
    )
    return [
        deployment(AGENT, AGENT_REPLICAS, spec),
        pdb(AGENT, 1),
        service(
            CA_SERVICE,
            [
                service_port("grpc-ca", CA_PORT, appProtocol="grpc"),
                service_port("grpc-ca-renew", CA_RENEW_PORT, appProtocol="grpc"),
            ],
            AGENT,
        ),
    ]


def identity_volume() -> Obj:
    """The gateway's bootstrap directory (`ca.bootstrap.Bootstrap`): a projected token with
    audience `fedgate`, which the agent's CA checks with a TokenReview, and the public roots."""
    return {
        "name": "identity",
        "projected": {
            "defaultMode": 0o440,
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": TOKEN_AUDIENCE,
                        "expirationSeconds": 3600,
                        "path": "token",
                    }
                },
                {
                    "configMap": {
                        "name": BOOTSTRAP_CONFIGMAP,
                        "items": [
                            {"key": key, "path": key}
                            for key in ("ca.pem", "control.pem", "trust-domain")
                        ],
                    }
                },
            ],
        },
    }


def _tunnel_args(transport: str) -> list[str]:
    if transport == "passthrough":
        # The published port is passthrough's; tls moves off it (same port, same protocol).
        return ["--tls-listen=off", f"--passthrough-listen={ANY}:{TUNNEL_PORT}"]
    return []


def gateway(settings: ManifestSettings) -> list[Obj]:
    args = [
        "gateway",
        f"--cluster={settings.cluster}",
        f"--identity-dir={IDENTITY_DIR}",
        f"--ca={in_cluster(CA_SERVICE, CA_PORT)}",
        f"--controller={settings.controller_address}",
        f"--tunnel-listen={ANY}:{TUNNEL_PORT}",
        *_tunnel_args(settings.transport),
        f"--egress-listen={ANY}:{EGRESS_PORT}",
        f"--admin={ANY}:{GATEWAY_ADMIN_PORT}",
        f"--metrics-listen={ANY}:{GATEWAY_METRICS_PORT}",
    ]
    container = fedgate_container(
        settings,
        "gateway",
        args,
        [
            port("tunnel-tcp", TUNNEL_PORT),
            port("tunnel-udp", TUNNEL_PORT, "UDP"),
            port("tcp-egress", EGRESS_PORT),
            port("http-metrics", GATEWAY_METRICS_PORT),
            port("admin", GATEWAY_ADMIN_PORT),
        ],
        GATEWAY_ADMIN_PORT,
        [mount("identity", IDENTITY_DIR)],
        sizes=("500m", "256Mi", "1Gi"),
    )
    spec = pod_spec(GATEWAY, GATEWAY_SERVICE_ACCOUNT, [container], [identity_volume()])
    node_port = GATEWAY_NODE_PORT if settings.node_ports else None
    return [
        deployment(GATEWAY, GATEWAY_REPLICAS, spec),
        # The WAN side: peer gateways' tunnels (TCP for tls and passthrough, UDP for quic) and
        # the metrics port the controllers' topology page reads on the published host.
        service(
            GATEWAY,
            [
                service_port("tunnel-tcp", TUNNEL_PORT, node_port=node_port),
                service_port("tunnel-udp", TUNNEL_PORT, "UDP", node_port=node_port),
                service_port("http-metrics", GATEWAY_METRICS_PORT),
            ],
            GATEWAY,
            settings.gateway_service,
        ),
        # The cluster side: sidecars' CONNECTs. Never on the load balancer.
        service(GATEWAY_EGRESS, [service_port("tcp-egress", EGRESS_PORT)], GATEWAY),
        pdb(GATEWAY, 1),
    ]
