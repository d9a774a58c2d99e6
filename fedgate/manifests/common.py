"""Building blocks shared by every fedgate workload: labels, security, probes, volumes."""

from __future__ import annotations

from typing import Any

from fedgate.manifests.settings import NAMESPACE, ManifestSettings

Obj = dict[str, Any]

PART_OF = "fedgate"
# The image's user (Dockerfile): the sidecar's UID, which the capture rules exempt.
UID = 1337


def labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": PART_OF}


def selector(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name}


def meta(name: str, namespace: str | None = NAMESPACE, **extra: Any) -> Obj:
    out: Obj = {"name": name, "labels": labels(name), **extra}
    if namespace is not None:
        out["namespace"] = namespace
    return out


def obj(api_version: str, kind: str, metadata: Obj, **body: Any) -> Obj:
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata, **body}


def container_security() -> Obj:
    """Nothing beyond an unprivileged process: no capability, no escalation, read-only root."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_security() -> Obj:
    return {"runAsNonRoot": True, "fsGroup": UID, "seccompProfile": {"type": "RuntimeDefault"}}


def http_probes(port: int) -> Obj:
    """The admin port's /healthz (alive) and /readyz (ready), as every fedgate process serves.

    A proxy opens its admin port only once it holds an identity, which needs the agent's CA:
    the startup probe gives it five minutes (a gateway started before its agent waits, instead
    of being restarted by the liveness probe), after which liveness takes over.
    """
    return {
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": port},
            "periodSeconds": 5,
            "failureThreshold": 60,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": port},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": port},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
    }


def resources(cpu: str, memory: str, memory_limit: str) -> Obj:
    # No CPU limit: throttling a proxy adds latency to every call (Istio's and Linkerd's advice).
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory_limit}}


def fedgate_container(
    settings: ManifestSettings,
    name: str,
    args: list[str],
    ports: list[Obj],
    admin_port: int,
    mounts: list[Obj],
    sizes: tuple[str, str, str] = ("100m", "128Mi", "512Mi"),
) -> Obj:
    return {
        "name": name,
        "image": settings.image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "ports": ports,
        **http_probes(admin_port),
        "resources": resources(*sizes),
        "securityContext": container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *mounts],
    }


def port(name: str, number: int, protocol: str = "TCP") -> Obj:
    return {"name": name, "containerPort": number, "protocol": protocol}


def tmp_volume() -> Obj:
    return {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}


def secret_volume(name: str, secret: str) -> Obj:
    return {"name": name, "secret": {"secretName": secret, "defaultMode": 0o440}}


def mount(name: str, path: str) -> Obj:
    return {"name": name, "mountPath": path, "readOnly": True}


def spread(name: str) -> Obj:
    """Prefer replicas on different nodes (preferred, not required: a one-node kind cluster
    must still run both)."""
    return {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": selector(name)},
                    },
                }
            ]
        }
    }


def deployment(name: str, replicas: int, pod_spec: Obj) -> Obj:
    return obj(
        "apps/v1",
        "Deployment",
        meta(name),
        spec={
            "replicas": replicas,
            "selector": {"matchLabels": selector(name)},
            # Never below the wanted replicas during an upgrade: one new pod comes up first.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {"metadata": {"labels": labels(name)}, "spec": pod_spec},
        },
    )


def pod_spec(
    name: str,
    service_account: str,
    containers: list[Obj],
    volumes: list[Obj],
    *,
    automount: bool = False,
) -> Obj:
    return {
        "serviceAccountName": service_account,
        # Only the agent talks to the Kubernetes API; the others get no API token at all.
        "automountServiceAccountToken": automount,
        "securityContext": pod_security(),
        "affinity": spread(name),
        "containers": containers,
        "volumes": [tmp_volume(), *volumes],
    }


def service(
    name: str, ports: list[Obj], target: str, service_type: str = "ClusterIP", **spec: Any
) -> Obj:
    return obj(
        "v1",
        "Service",
        meta(name),
        spec={"type": service_type, "selector": selector(target), "ports": ports, **spec},
    )


def service_port(
    name: str, number: int, protocol: str = "TCP", node_port: int | None = None, **extra: Any
) -> Obj:
    out: Obj = {"name": name, "port": number, "targetPort": number, "protocol": protocol}
    if node_port is not None:
        out["nodePort"] = node_port
    return {**out, **extra}


def pdb(name: str, min_available: int) -> Obj:
    return obj(
        "policy/v1",
        "PodDisruptionBudget",
        meta(name),
        spec={"minAvailable": min_available, "selector": {"matchLabels": selector(name)}},
    )
