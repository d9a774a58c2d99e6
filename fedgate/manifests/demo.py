"""The demo workload of the kind rig: `echo` exported from some clusters, a `client` to curl
it from another, in the namespace `demo`, labelled for sidecar injection."""

from __future__ import annotations

from fedgate.manifests.common import (
    Obj,
    container_security,
    deployment,
    meta,
    obj,
    pod_security,
    port,
    resources,
    service,
    service_port,
)
from fedgate.manifests.settings import DEFAULT_IMAGE

DEMO_NAMESPACE = "demo"
ECHO_PORT = 8080
CLIENT_IMAGE = "curlimages/curl:8.11.1"
# Not the sidecar's UID 1337, whose traffic the capture rules let through uncaptured.
APP_USER = {"runAsUser": 1000, "runAsGroup": 1000}


def _in_demo(o: Obj) -> Obj:
    o["metadata"]["namespace"] = DEMO_NAMESPACE
    return o


def _pod(containers: list[Obj]) -> Obj:
    return {
        "securityContext": pod_security(),
        "containers": containers,
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }


def echo(cluster: str, image: str = DEFAULT_IMAGE) -> list[Obj]:
    container = {
        "name": "echo",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["echo", f"--cluster={cluster}", "--pod=$(POD_NAME)", f"--port={ECHO_PORT}"],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [port("http", ECHO_PORT)],
        "resources": resources("50m", "64Mi", "256Mi"),
        "securityContext": {**container_security(), **APP_USER},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    return [
        _in_demo(deployment("echo", 2, _pod([container]))),
        _in_demo(service("echo", [service_port("http", ECHO_PORT, appProtocol="http")], "echo")),
        obj(
            "multicluster.x-k8s.io/v1alpha1",
            "ServiceExport",
            {"name": "echo", "namespace": DEMO_NAMESPACE},
        ),
    ]


def client() -> list[Obj]:
    container = {
        "name": "client",
        "image": CLIENT_IMAGE,
        "command": ["sleep", "infinity"],
        "resources": resources("10m", "16Mi", "64Mi"),
        "securityContext": {**container_security(), **APP_USER},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    return [_in_demo(deployment("client", 1, _pod([container])))]


def namespace() -> Obj:
    ns = meta(DEMO_NAMESPACE, namespace=None)
    ns["labels"]["fedgate.io/inject"] = "enabled"  # the agent's webhook adds the sidecars
    return obj("v1", "Namespace", ns)


def demo(cluster: str, *, serve: bool, call: bool, image: str = DEFAULT_IMAGE) -> list[Obj]:
    return [namespace(), *(echo(cluster, image) if serve else []), *(client() if call else [])]
