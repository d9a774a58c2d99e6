"""What an injected pod holds: the capture init container, the sidecar, its identity and DNS.

`inject_pod` takes a pod's `metadata` and `spec` (plain JSON data, as the API server sends them)
and returns injected copies; it never mutates its input. What it adds, by name:

* init container `fedgate-init`, first: `fedgate capture install ...`, which makes the rules
  with `sidecar.capture.capture_rules` (the function the rig's sidecars use) and applies them
  with `iptables-restore`. It alone has `NET_ADMIN` and `NET_RAW` (everything else dropped),
  runs as root because iptables needs it, and exits.
* the sidecar `fedgate-proxy`, as a *native sidecar* (an init container with `restartPolicy:
  Always`, Kubernetes 1.29+): it starts after the rules and before the pod's own init containers
  and containers, its `startupProbe` (`/readyz`) holds them until it has an identity and a
  config, and it does not keep a Job from completing. UID/GID 1337 (the GID the capture rules
  let through), non-root, read-only root filesystem, every capability dropped, no privilege
  escalation. Its admin port stays on 127.0.0.1; `/healthz`, `/readyz` and `/metrics` are served
  on the probe port (`--metrics-listen`), which the rules accept from outside the pod so the
  kubelet's probes and Prometheus reach it.
* volume `fedgate-identity`, mounted read-only into the sidecar only: a projected ServiceAccount
  token with audience `fedgate` (the agent's CA checks it with TokenReview) and the
  `fedgate-bootstrap` ConfigMap (`ca.pem`, `control.pem`, `trust-domain`; the one the gateway
  mounts, copied into each injected namespace), the layout
  `ca.bootstrap.Bootstrap` reads.
* DNS: the sidecar answers `*.clusterset.local` on 127.0.0.1:53 and REFUSES every other name;
  glibc and musl both move on to the next nameserver after REFUSED, so the pod gets
  `dnsPolicy: None` with nameservers `[127.0.0.1, <cluster DNS>]` and the `ClusterFirst` search
  list of its namespace (`ndots:5`). A pod that already has `dnsPolicy: None` keeps its
  nameservers behind 127.0.0.1. Binding port 53 as UID 1337 needs the namespaced, "safe" sysctl
  `net.ipv4.ip_unprivileged_port_start=53` (allowed by default since Kubernetes 1.22).
* annotation `fedgate.io/injected: <version>` (injecting again changes nothing) and label
  `fedgate.io/injected: "true"` (PodMonitors select injected pods by it).

What it does not do: rewrite the application's own httpGet/tcpSocket probes (the capture rules
drop connections to application ports that do not come through the sidecar, so such a probe
fails; Istio rewrites them through its agent), decide whether a pod may be injected (`objects`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

INJECT_ANNOTATION = "fedgate.io/inject"
INJECTED_ANNOTATION = "fedgate.io/injected"
INJECTED_LABEL = "fedgate.io/injected"
# The sidecar's --metrics-listen port: probes and Prometheus (deploy/monitoring selects it).
METRICS_PORT_NAME = "fedgate-metrics"
INIT_NAME = "fedgate-init"
PROXY_NAME = "fedgate-proxy"
IDENTITY_VOLUME = "fedgate-identity"
IDENTITY_DIR = "/var/run/fedgate/identity"
TOKEN_AUDIENCE = "fedgate"
PORT_SYSCTL = "net.ipv4.ip_unprivileged_port_start"
SIDECAR_DNS = "127.0.0.1"
DNS_PORT = 53
MAX_NAMESERVERS = 3  # Kubernetes validation (and glibc's MAXNS)

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class InjectSettings:
    """Everything the injected containers are configured with; parsed once in fedgate/.

    `cluster`: the cluster the sidecars run in. `ca_address`, `controller_address`: what the
    sidecar dials (host:port) for its SVID and its config stream. `outbound_port`,
    `inbound_port`, `proxy_uid`/`proxy_gid`: the capture rules' ports and the sidecar's user
    (the rules let GID `proxy_gid` through). `admin_port`: the sidecar's admin port on
    127.0.0.1; `probe_port`: its metrics-only listener on every address (probes, scraping).
    `cluster_dns`: the cluster's DNS Service IP (kube-dns), the second nameserver;
    `cluster_domain`: the cluster's DNS domain. `version`: recorded in the annotation.
    `otlp_endpoint`: where the sidecars export traces ("": tracing off).
    `bootstrap_config_map`: the ConfigMap with the roots and trust domain, in the pod's namespace.
    """

    cluster: str
    controller_address: str
    ca_address: str = "fedgate-ca.fedgate-system.svc:15013"
    image: str = "fedgate:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    version: str = "0.1.0"
    outbound_port: int = 15001
    inbound_port: int = 15006
    proxy_uid: int = 1337
    proxy_gid: int = 1337
    admin_port: int = 15000
    probe_port: int = 15020
    cluster_dns: str = "10.96.0.10"
    cluster_domain: str = "cluster.local"
    token_expiration_seconds: int = 3600
    proxy_cpu_request: str = "100m"
    proxy_memory_request: str = "128Mi"
    proxy_memory_limit: str = "512Mi"
    otlp_endpoint: str = ""  # the sidecars' trace collector (`fedgate sidecar --otlp-endpoint`)
    bootstrap_config_map: str = "fedgate-bootstrap"

    def __post_init__(self) -> None:
        if not self.cluster or not self.controller_address:
            raise ValueError("the cluster and the controller address are required")
        for name in ("outbound_port", "inbound_port", "admin_port", "probe_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ValueError(f"{name} {getattr(self, name)} is outside 1..65535")
        if self.token_expiration_seconds < 600:
            raise ValueError("token_expiration_seconds must be at least 600 (Kubernetes minimum)")

    def capture_args(self) -> list[str]:
        """The `fedgate capture install` arguments: the rig's rules plus the probe port."""
        return [
            "capture",
            "install",
            "--outbound-port",
            str(self.outbound_port),
            "--inbound-port",
            str(self.inbound_port),
            "--proxy-gid",
            str(self.proxy_gid),
            "--accept-port",
            str(self.probe_port),
        ]


def _probe(path: str, port: int, period: int, failures: int) -> Json:
    return {
        "httpGet": {"path": path, "port": port, "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": 1,
        "failureThreshold": failures,
    }


def init_container(s: InjectSettings) -> Json:
    return {
        "name": INIT_NAME,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": ["fedgate"],
        "args": s.capture_args(),
        "resources": {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"memory": "128Mi"},
        },
        # iptables needs root with NET_ADMIN (and NET_RAW for its raw socket); nothing else.
        # The root filesystem stays writable for iptables' lock file, as Istio's init does.
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def proxy_container(s: InjectSettings) -> Json:
    return {
        "name": PROXY_NAME,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "restartPolicy": "Always",  # a native sidecar (KEP-753)
        "command": ["fedgate"],
        "args": [
            "sidecar",
            "--cluster",
            s.cluster,
            "--identity-dir",
            IDENTITY_DIR,
            "--ca",
            s.ca_address,
            "--controller",
            s.controller_address,
            "--admin",
            f"127.0.0.1:{s.admin_port}",
            "--metrics-listen",
            f"0.0.0.0:{s.probe_port}",
            "--pod",
            "$(POD_NAME)",
            "--namespace",
            "$(POD_NAMESPACE)",
            # The init container installed the rules: this process has no NET_ADMIN.
            "--no-capture",
            *(["--otlp-endpoint", s.otlp_endpoint] if s.otlp_endpoint else []),
        ],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
        ],
        "ports": [
            {"name": "fedgate-inbound", "containerPort": s.inbound_port, "protocol": "TCP"},
            {"name": METRICS_PORT_NAME, "containerPort": s.probe_port, "protocol": "TCP"},
        ],
        "resources": {
            "requests": {"cpu": s.proxy_cpu_request, "memory": s.proxy_memory_request},
            "limits": {"memory": s.proxy_memory_limit},
        },
        "securityContext": {
            "runAsUser": s.proxy_uid,
            "runAsGroup": s.proxy_gid,
            "runAsNonRoot": True,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        # Held until ready: the pod's containers start with an identity and routes in place
        # (their captured connections would be refused before). 2 min, then the kubelet restarts it.
        "startupProbe": _probe("/readyz", s.probe_port, 1, 120),
        "readinessProbe": _probe("/readyz", s.probe_port, 2, 3),
        "livenessProbe": _probe("/healthz", s.probe_port, 10, 3),
        "volumeMounts": [{"name": IDENTITY_VOLUME, "mountPath": IDENTITY_DIR, "readOnly": True}],
    }


def identity_volume(s: InjectSettings) -> Json:
    files = ("ca.pem", "control.pem", "trust-domain")
    return {
        "name": IDENTITY_VOLUME,
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": TOKEN_AUDIENCE,
                        "expirationSeconds": s.token_expiration_seconds,
                        "path": "token",
                    }
                },
                {
                    "configMap": {
                        "name": s.bootstrap_config_map,
                        "items": [{"key": f, "path": f} for f in files],
                    }
                },
            ]
        },
    }


def _dns(spec: Json, namespace: str, s: InjectSettings) -> None:
    config: Json = dict(spec.get("dnsConfig") or {})
    if spec.get("dnsPolicy") == "None":
        # The pod chose its resolvers: keep them, behind the sidecar.
        others = [n for n in config.get("nameservers", []) if n != SIDECAR_DNS]
        if len(others) >= MAX_NAMESERVERS:
            raise ValueError(
                f"dnsConfig already lists {len(others)} nameservers; the sidecar needs one of "
                f"the {MAX_NAMESERVERS} Kubernetes allows"
            )
        config["nameservers"] = [SIDECAR_DNS, *others]
    else:
        # What ClusterFirst would give (kubelet's search list for the namespace), with the
        # sidecar first; the pod's own dnsConfig searches and options are appended, as the
        # kubelet does.
        d = s.cluster_domain
        searches = [f"{namespace}.svc.{d}", f"svc.{d}", d]
        searches += [x for x in config.get("searches", []) if x not in searches]
        options = list(config.get("options", []))
        if not any(o.get("name") == "ndots" for o in options):
            options.insert(0, {"name": "ndots", "value": "5"})
        config = {
            "nameservers": [SIDECAR_DNS, s.cluster_dns],
            "searches": searches,
            "options": options,
        }
        spec["dnsPolicy"] = "None"
    spec["dnsConfig"] = config


def _sysctl(spec: Json) -> None:
    security: Json = spec.setdefault("securityContext", {})
    sysctls: list[Json] = security.setdefault("sysctls", [])
    for entry in sysctls:
        if entry.get("name") == PORT_SYSCTL:
            if int(entry.get("value", "1024")) > DNS_PORT:
                entry["value"] = str(DNS_PORT)
            return
    sysctls.append({"name": PORT_SYSCTL, "value": str(DNS_PORT)})


def inject_pod(
    metadata: Mapping[str, Any], spec: Mapping[str, Any], namespace: str, s: InjectSettings
) -> tuple[Json, Json]:
    """Injected copies of a pod's (metadata, spec); ValueError says why it cannot be done."""
    meta = copy.deepcopy(dict(metadata))
    new = copy.deepcopy(dict(spec))
    names = {c.get("name") for key in ("initContainers", "containers") for c in new.get(key) or []}
    taken = names & {INIT_NAME, PROXY_NAME}
    if taken:
        raise ValueError(f"it already has a container named {sorted(taken)[0]}")
    if any(v.get("name") == IDENTITY_VOLUME for v in new.get("volumes") or []):
        raise ValueError(f"it already has a volume named {IDENTITY_VOLUME}")
    new["initContainers"] = [
        init_container(s),
        proxy_container(s),
        *(new.get("initContainers") or []),
    ]
    new["volumes"] = [*(new.get("volumes") or []), identity_volume(s)]
    _dns(new, namespace, s)
    _sysctl(new)
    meta["annotations"] = {**(meta.get("annotations") or {}), INJECTED_ANNOTATION: s.version}
    meta["labels"] = {**(meta.get("labels") or {}), INJECTED_LABEL: "true"}
    return meta, new
