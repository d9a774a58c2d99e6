"""The admission webhook over real HTTPS: its JSON Patch, applied to the pod, is the CLI's output.

The server is the agent's (`fedgate.inject_webhook.start`, a certificate from a CA made for the
test); the client trusts only the `caBundle` of the rendered `MutatingWebhookConfiguration` and
checks the Service's DNS name, as the API server does. Patches are applied with the `jsonpatch`
package, an implementation independent of ours.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime as dt
import http.client
import json
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import jsonpatch
import pytest
import yaml
from cryptography import x509

from ca.authority import CertificateAuthority
from ca.service import CaView
from ca.verify import utcnow
from clusters.inject.admission import webhook_configuration
from clusters.inject.webhook import WebhookServer
from fedgate.inject_webhook import WebhookOptions, start
from mesh.tasks import TaskSet
from tests.clusters.inject.conftest import CONFIG, FIXTURES, objects, run_inject, validate
from tests.helpers import until


class _Connection(http.client.HTTPSConnection):
    """Dials 127.0.0.1 but verifies the certificate for the Service's DNS name (`host`)."""

    def __init__(self, port: int, host: str, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=10)
        self._tls = context

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)


class Client:
    """One keep-alive HTTPS connection to the webhook, verified as the API server would."""

    def __init__(self, port: int, ca_bundle_pem: bytes, service_host: str) -> None:
        ctx = ssl.create_default_context(cadata=ca_bundle_pem.decode())
        self._conn = _Connection(port, service_host, ctx)
        self.connects = 0

    def _request(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if self._conn.sock is None:
            self.connects += 1
        self._conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = self._conn.getresponse()
        return r.status, json.loads(r.read())

    async def post(
        self, path: str, body: bytes, method: str = "POST"
    ) -> tuple[int, dict[str, Any]]:
        return await asyncio.to_thread(self._request, method, path, body)

    def close(self) -> None:
        self._conn.close()


@pytest.fixture
async def webhook() -> AsyncIterator[tuple[WebhookServer, Client]]:
    ca = CertificateAuthority.create("east.fedgate.test", utcnow())
    tasks = TaskSet("test-webhook")
    options = WebhookOptions("127.0.0.1:0", "fedgate-agent", "fedgate-system", CONFIG)
    server = await start(options, "east", lambda: CaView.of(ca), tasks)
    config = webhook_configuration(ca.root_pem, "fedgate-agent", "fedgate-system")
    validate(config)
    hook = config["webhooks"][0]
    bundle = base64.b64decode(hook["clientConfig"]["caBundle"])
    svc = hook["clientConfig"]["service"]
    client = Client(server.address[1], bundle, f"{svc['name']}.{svc['namespace']}.svc")
    try:
        yield server, client
    finally:
        client.close()
        await server.aclose()
        await tasks.aclose()


def _pod(template: dict[str, Any], generate_name: str) -> dict[str, Any]:
    """The Pod a workload controller creates from `template` (namespace left to the request)."""
    meta = copy.deepcopy(template.get("metadata") or {})
    meta["generateName"] = generate_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]}


def _review(pod: dict[str, Any], namespace: str, uid: str = "705ab4f5-6393-11e8-b7cc") -> bytes:
    return json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": namespace,
                "operation": "CREATE",
                "object": pod,
            },
        }
    ).encode()


def _pods() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name in ("deployment-with-init", "statefulset", "list"):
        for obj in objects((FIXTURES / f"{name}.yaml").read_text()):
            if obj["kind"] != "Service":
                ns = obj["metadata"]["namespace"]
                out.append((ns, _pod(obj["spec"]["template"], obj["metadata"]["name"] + "-")))
    return out


async def test_the_patch_applied_to_the_pod_equals_the_cli_output(
    webhook: tuple[WebhookServer, Client],
) -> None:
    server, client = webhook
    pods = _pods()
    assert len(pods) == 4  # Deployment, StatefulSet, DaemonSet and Job templates
    for namespace, pod in pods:  # one connection: the API server keeps it alive
        status, answer = await client.post("/inject", _review(pod, namespace))
        assert status == 200
        response = answer["response"]
        assert (answer["apiVersion"], answer["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
        assert response["uid"] == "705ab4f5-6393-11e8-b7cc"
        assert response["allowed"] is True
        assert response["patchType"] == "JSONPatch"
        patch = json.loads(base64.b64decode(response["patch"]))
        patched = jsonpatch.apply_patch(pod, patch)
        code, out, err = run_inject("--namespace", namespace, stdin=yaml.safe_dump(pod))
        assert code == 0, err
        (from_cli,) = objects(out)
        assert patched == from_cli
        validate({**patched, "metadata": {**patched["metadata"], "name": "p"}})
    assert server.status() == {"reviews": 4, "errors": 0}
    assert client.connects == 1


@pytest.mark.parametrize("name", ["opted-out-pod", "already-injected-pod"])
async def test_pods_left_alone_get_no_patch(
    webhook: tuple[WebhookServer, Client], name: str
) -> None:
    _, client = webhook
    (pod,) = objects((FIXTURES / f"{name}.yaml").read_text())
    status, answer = await client.post("/inject", _review(pod, pod["metadata"]["namespace"]))
    assert status == 200
    assert answer["response"] == {"uid": "705ab4f5-6393-11e8-b7cc", "allowed": True}


async def test_a_host_network_pod_is_admitted_uninjected_with_a_warning(
    webhook: tuple[WebhookServer, Client],
) -> None:
    _, client = webhook
    (pod,) = objects((FIXTURES / "hostnetwork-pod.yaml").read_text())
    status, answer = await client.post("/inject", _review(pod, "monitoring"))
    assert status == 200
    response = answer["response"]
    assert response["allowed"] is True
    assert "patch" not in response
    (warning,) = response["warnings"]
    assert "Pod monitoring/node-exporter" in warning
    assert "hostNetwork" in warning


async def test_bad_requests_are_answered_and_counted(
    webhook: tuple[WebhookServer, Client],
) -> None:
    server, client = webhook
    assert (await client.post("/other", b"{}"))[0] == 404
    assert (await client.post("/inject", b"", method="GET"))[0] == 405
    status, answer = await client.post("/inject", b"not json")
    assert status == 400
    assert "error" in answer
    status, answer = await client.post("/inject", json.dumps({"kind": "Pod"}).encode())
    assert status == 400
    assert "AdmissionReview" in answer["error"]
    # The server lives on: a good review after the bad ones is answered.
    (pod,) = objects((FIXTURES / "opted-out-pod.yaml").read_text())
    assert (await client.post("/inject", _review(pod, "shop")))[0] == 200
    assert server.status() == {"reviews": 1, "errors": 4}


def test_the_webhook_configuration_selects_labelled_namespaces_and_never_blocks() -> None:
    ca = CertificateAuthority.create("east.fedgate.test", utcnow())
    config = webhook_configuration(ca.root_pem)
    validate(config)
    (hook,) = config["webhooks"]
    assert hook["namespaceSelector"] == {"matchLabels": {"fedgate.io/inject": "enabled"}}
    assert hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["rules"][0]["resources"] == ["pods"]
    assert hook["clientConfig"]["service"] == {
        "name": "fedgate-agent",
        "namespace": "fedgate-system",
        "path": "/inject",
        "port": 443,
    }


async def test_the_certificate_is_renewed_into_the_running_server() -> None:
    ca = CertificateAuthority.create("east.fedgate.test", utcnow())
    view = CaView(ca, (ca.root,), max_ttl=dt.timedelta(seconds=4))  # renewed after ~2 s
    tasks = TaskSet("test-webhook")
    options = WebhookOptions("127.0.0.1:0", "fedgate-agent", "fedgate-system", CONFIG)
    server = await start(options, "east", lambda: view, tasks)

    async def serial() -> int:
        pem = await asyncio.to_thread(ssl.get_server_certificate, server.address, timeout=5)
        return x509.load_pem_x509_certificate(pem.encode()).serial_number

    try:
        first = await serial()
        await until(serial, 10, check=lambda s: s != first, what="a renewed certificate")
    finally:
        await server.aclose()
        await tasks.aclose()


@pytest.mark.parametrize(("operation", "kind"), [("UPDATE", "Pod"), ("CREATE", "Deployment")])
def test_anything_but_a_pod_create_is_admitted_untouched(operation: str, kind: str) -> None:
    from clusters.inject.admission import review
    from fedgate import inject_config

    body = json.loads(_review(POD_TEMPLATE, "demo"))
    body["request"]["operation"] = operation
    body["request"]["kind"]["kind"] = kind
    answer = review(body, inject_config.load(CONFIG))
    assert answer["response"] == {"uid": "705ab4f5-6393-11e8-b7cc", "allowed": True}


POD_TEMPLATE = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "web"},
    "spec": {"containers": [{"name": "web", "image": "nginx"}]},
}


def test_the_configuration_without_a_bundle_leaves_ca_bundle_to_the_installer() -> None:
    config = webhook_configuration(None, "fedgate-ca", "fedgate-system", 15017)
    validate(config)
    client = config["webhooks"][0]["clientConfig"]
    assert "caBundle" not in client
    assert client["service"]["name"] == "fedgate-ca"
    assert client["service"]["port"] == 15017
