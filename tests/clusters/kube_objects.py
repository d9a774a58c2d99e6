"""Builders for Kubernetes objects as a client would send them (the fake fills in the rest),
and the fixture loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parents[1] / "kubefake" / "fixtures"
NS = "shop"
SERVICE_NAME = "kubernetes.io/service-name"

Obj = dict[str, Any]


def fixture(name: str) -> Obj:
    data = json.loads((FIXTURES / name).read_text())
    assert isinstance(data, dict)
    return data


def service(name: str, *ports: tuple[str, int, str | None], ns: str = NS) -> Obj:
    """`ports` are (name, port, appProtocol or None)."""
    spec_ports = []
    for pname, port, app in ports:
        p: Obj = {"name": pname, "port": port, "protocol": "TCP", "targetPort": port}
        if app is not None:
            p["appProtocol"] = app
        spec_ports.append(p)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"ports": spec_ports, "selector": {"app": name}},
    }


def endpoint(
    address: str,
    pod: str | None,
    *,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    uid: str | None = None,
    ns: str = NS,
) -> Obj:
    conditions: Obj = {}
    for key, value in (("ready", ready), ("serving", serving), ("terminating", terminating)):
        if value is not None:
            conditions[key] = value
    ep: Obj = {"addresses": [address], "conditions": conditions}
    if pod is not None:
        ep["targetRef"] = {"kind": "Pod", "namespace": ns, "name": pod}
        if uid is not None:
            ep["targetRef"]["uid"] = uid
    return ep


def endpoint_slice(name: str, service_name: str, *endpoints: Obj, ns: str = NS) -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {
                SERVICE_NAME: service_name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "endpoints": list(endpoints),
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def pod(name: str, service_account: str, ns: str = NS, **labels: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
        "spec": {
            "serviceAccountName": service_account,
            "containers": [{"name": "app", "image": "registry.example/app:1"}],
        },
        "status": {"phase": "Running"},
    }


def service_export(name: str, ns: str = NS) -> Obj:
    return {
        "apiVersion": "multicluster.x-k8s.io/v1alpha1",
        "kind": "ServiceExport",
        "metadata": {"name": name, "namespace": ns},
    }
