"""What the management cluster adds: the federation controller and its etcd.

etcd is a 3-member StatefulSet speaking TLS on both ports: peers authenticate each other with
certificates (`--peer-client-cert-auth`), clients verify the server certificate (one name,
`ETCD_SERVER_NAME`, whatever address they dial) and log in as their own etcd user, so the
per-cluster roles of `federation.etcd_auth` hold: an agent writes only its own cluster's
prefix. A Job (`fedgate etcd provision`) creates the users and roles and turns auth on; it is
idempotent and adds the users of clusters that joined since (docs/kubernetes.md).
"""

from __future__ import annotations

from fedgate.manifests.common import (
    Obj,
    container_security,
    deployment,
    fedgate_container,
    labels,
    meta,
    mount,
    obj,
    pdb,
    pod_security,
    pod_spec,
    port,
    resources,
    secret_volume,
    selector,
    service,
    service_port,
    spread,
    tmp_volume,
)
from fedgate.manifests.settings import (
    CONTROL_CA_SECRET,
    CONTROL_SERVICE,
    CONTROLLER,
    CONTROLLER_ADMIN_PORT,
    CONTROLLER_GRPC_PORT,
    CONTROLLER_NODE_PORT,
    ETCD,
    ETCD_CLIENT_PORT,
    ETCD_CLIENT_SERVICE,
    ETCD_MEMBERS,
    ETCD_METRICS_PORT,
    ETCD_NODE_PORT,
    ETCD_PEER_PORT,
    ETCD_PEER_SECRET,
    ETCD_PROVISION,
    ETCD_SERVER_NAME,
    ETCD_SERVER_SECRET,
    ETCD_USERS_SECRET,
    NAMESPACE,
    ManifestSettings,
    etcd_client_args,
    etcd_member,
    etcd_member_host,
)

CONTROLLER_REPLICAS = 2
CONTROL_CA_DIR = "/var/run/fedgate/control-ca"
ETCD_DIR = "/var/run/fedgate/etcd"
USERS_DIR = "/var/run/fedgate/etcd-users"
GITOPS_DIR = "/var/lib/fedgate/gitops"
POD_NAME = {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}


def _etcd_client_volume(user: str) -> Obj:
    """ca.crt (to verify etcd) and `user`'s password, as the etcd flags expect them."""
    return {
        "name": "etcd",
        "projected": {
            "defaultMode": 0o440,
            "sources": [
                {"secret": {"name": ETCD_SERVER_SECRET, "items": [_item("ca.crt")]}},
                {"secret": {"name": ETCD_USERS_SECRET, "items": [_item(user, "password")]}},
            ],
        },
    }


def _item(key: str, path: str = "") -> Obj:
    return {"key": key, "path": path or key}


def controller(settings: ManifestSettings) -> list[Obj]:
    args = [
        "controller",
        *etcd_client_args(settings.etcd_endpoints, "controller", ETCD_DIR),
        f"--listen=0.0.0.0:{CONTROLLER_GRPC_PORT}",
        f"--admin=0.0.0.0:{CONTROLLER_ADMIN_PORT}",
        f"--ca-dir={CONTROL_CA_DIR}",
        "--replica=$(POD_NAME)",  # the kubelet expands it from the env below
        f"--config-workdir={GITOPS_DIR}",
    ]
    container = fedgate_container(
        settings,
        "controller",
        args,
        [port("grpc-config", CONTROLLER_GRPC_PORT), port("admin", CONTROLLER_ADMIN_PORT)],
        CONTROLLER_ADMIN_PORT,
        [
            mount("control-ca", CONTROL_CA_DIR),
            mount("etcd", ETCD_DIR),
            {"name": "gitops", "mountPath": GITOPS_DIR},
        ],
        sizes=("200m", "256Mi", "1Gi"),
    )
    container["env"] = [POD_NAME]
    spec = pod_spec(
        CONTROLLER,
        CONTROLLER,
        [container],
        [
            secret_volume("control-ca", CONTROL_CA_SECRET),
            _etcd_client_volume("controller"),
            {"name": "gitops", "emptyDir": {}},
        ],
    )
    grpc = service_port("grpc-config", CONTROLLER_GRPC_PORT, appProtocol="grpc")
    node_port = CONTROLLER_NODE_PORT if settings.node_ports else None
    return [
        deployment(CONTROLLER, CONTROLLER_REPLICAS, spec),
        service(
            CONTROLLER,
            [grpc, service_port("admin", CONTROLLER_ADMIN_PORT)],
            CONTROLLER,
        ),
        # How member clusters' gateways and sidecars reach the config streams.
        service(
            CONTROL_SERVICE,
            [{**grpc, **({"nodePort": node_port} if node_port else {})}],
            CONTROLLER,
            settings.gateway_service,
        ),
        pdb(CONTROLLER, 1),
    ]


def _etcd_args() -> list[str]:
    peers = ",".join(
        f"{etcd_member(i)}=https://{etcd_member_host(i)}:{ETCD_PEER_PORT}"
        for i in range(ETCD_MEMBERS)
    )
    me = f"$(POD_NAME).{ETCD}.{NAMESPACE}.svc"
    return [
        "--name=$(POD_NAME)",
        "--data-dir=/var/lib/etcd/data",
        f"--listen-client-urls=https://0.0.0.0:{ETCD_CLIENT_PORT}",
        f"--advertise-client-urls=https://{me}:{ETCD_CLIENT_PORT}",
        f"--listen-peer-urls=https://0.0.0.0:{ETCD_PEER_PORT}",
        f"--initial-advertise-peer-urls=https://{me}:{ETCD_PEER_PORT}",
        f"--listen-metrics-urls=http://0.0.0.0:{ETCD_METRICS_PORT}",
        f"--initial-cluster={peers}",
        "--initial-cluster-state=new",
        f"--initial-cluster-token={ETCD}",
        "--cert-file=/etc/etcd/server/tls.crt",
        "--key-file=/etc/etcd/server/tls.key",
        "--trusted-ca-file=/etc/etcd/server/ca.crt",
        "--peer-cert-file=/etc/etcd/peer/tls.crt",
        "--peer-key-file=/etc/etcd/peer/tls.key",
        "--peer-trusted-ca-file=/etc/etcd/peer/ca.crt",
        "--peer-client-cert-auth=true",
        "--auto-compaction-mode=periodic",
        "--auto-compaction-retention=1h",
    ]


def etcd(settings: ManifestSettings) -> list[Obj]:
    container = {
        "name": "etcd",
        "image": settings.etcd_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["etcd"],
        "args": _etcd_args(),
        "env": [POD_NAME],
        "ports": [
            port("client", ETCD_CLIENT_PORT),
            port("peer", ETCD_PEER_PORT),
            port("http-metrics", ETCD_METRICS_PORT),
        ],
        # kubeadm's probes for its etcd: alive without quorum, ready only with it.
        "livenessProbe": {
            "httpGet": {
                "path": "/health?exclude=NOSPACE&serializable=true",
                "port": ETCD_METRICS_PORT,
            },
            "periodSeconds": 10,
            "failureThreshold": 8,
            "initialDelaySeconds": 10,
        },
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": ETCD_METRICS_PORT},
            "periodSeconds": 5,
        },
        "resources": resources("100m", "256Mi", "1Gi"),
        "securityContext": {**container_security(), "readOnlyRootFilesystem": True},
        "volumeMounts": [
            {"name": "data", "mountPath": "/var/lib/etcd"},
            mount("server-tls", "/etc/etcd/server"),
            mount("peer-tls", "/etc/etcd/peer"),
        ],
    }
    headless = service(
        ETCD,
        [service_port("client", ETCD_CLIENT_PORT), service_port("peer", ETCD_PEER_PORT)],
        ETCD,
        clusterIP="None",
        # Members must find each other before any is ready (there is no quorum before).
        publishNotReadyAddresses=True,
    )
    node_port = ETCD_NODE_PORT if settings.node_ports else None
    statefulset = obj(
        "apps/v1",
        "StatefulSet",
        meta(ETCD),
        spec={
            "serviceName": ETCD,
            "replicas": ETCD_MEMBERS,
            # All members start together: a member waits for a quorum it cannot reach alone.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector(ETCD)},
            "template": {
                "metadata": {"labels": labels(ETCD)},
                "spec": {
                    "serviceAccountName": ETCD,
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security(),
                    "affinity": spread(ETCD),
                    "containers": [container],
                    "volumes": [
                        secret_volume("server-tls", ETCD_SERVER_SECRET),
                        secret_volume("peer-tls", ETCD_PEER_SECRET),
                    ],
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data"},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "2Gi"}},
                    },
                }
            ],
        },
    )
    return [
        headless,
        # Member clusters' agents reach etcd here (client port only, never the peer port).
        service(
            ETCD_CLIENT_SERVICE,
            [service_port("client", ETCD_CLIENT_PORT, node_port=node_port)],
            ETCD,
            settings.gateway_service,
        ),
        statefulset,
        pdb(ETCD, ETCD_MEMBERS // 2 + 1),  # never lose quorum to a voluntary disruption
        provision_job(settings),
    ]


def provision_job(settings: ManifestSettings) -> Obj:
    """Creates the etcd users and roles, then enables auth; re-run, it adds missing users."""
    args = [
        "etcd",
        "provision",
        f"--etcd={settings.etcd_endpoints}",
        f"--etcd-ca={ETCD_DIR}/ca.crt",
        f"--etcd-server-name={ETCD_SERVER_NAME}",
        f"--users-dir={USERS_DIR}",
        f"--clusters={','.join(settings.clusters)}",
    ]
    container = fedgate_container(settings, "provision", args, [], 0, [])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        del container[probe]  # a run-to-completion command has no admin port
    container["volumeMounts"] += [mount("etcd", ETCD_DIR), mount("users", USERS_DIR)]
    etcd_ca = {
        "name": "etcd",
        "secret": {"secretName": ETCD_SERVER_SECRET, "items": [_item("ca.crt")]},
    }
    spec = {
        "serviceAccountName": ETCD,
        "automountServiceAccountToken": False,
        "restartPolicy": "OnFailure",
        "securityContext": pod_security(),
        "containers": [container],
        "volumes": [tmp_volume(), etcd_ca, secret_volume("users", ETCD_USERS_SECRET)],
    }
    return obj(
        "batch/v1",
        "Job",
        meta(ETCD_PROVISION),
        spec={
            # etcd may still be electing its first leader: retry for a while.
            "backoffLimit": 20,
            # Gone a while after success, so the next `kubectl apply` (a cluster joined) runs
            # it again instead of failing on the immutable Job template.
            "ttlSecondsAfterFinished": 300,
            "template": {"metadata": {"labels": labels(ETCD_PROVISION)}, "spec": spec},
        },
    )
