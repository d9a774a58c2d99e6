"""`fedgate agent --webhook-listen`: the real agent process serves the injector over HTTPS with a
certificate of its own CA (checked against the roots it publishes, for the Service's DNS name)."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from ca.cadir import CaDirectory
from ca.verify import utcnow
from tests.ca.conftest import free_pair
from tests.clusters.inject.conftest import CONFIG
from tests.etcd_fixture import EtcdServer
from tests.helpers import free_port, until_sync

pytestmark = pytest.mark.etcd

SERVICE_NAME = "fedgate-agent.fedgate-system.svc"
POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "client"},
    "spec": {"containers": [{"name": "curl", "image": "curlimages/curl:8.8.0"}]},
}


def _post(port: int, roots: str, body: bytes) -> tuple[int, dict[str, object]]:
    ctx = ssl.create_default_context(cadata=roots)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=SERVICE_NAME) as tls,
    ):
        head = (
            f"POST /inject HTTP/1.1\r\nHost: {SERVICE_NAME}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        tls.sendall(head.encode() + body)
        response = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
        response.begin()
        return response.status, json.loads(response.read())


def test_the_agent_serves_the_webhook_with_its_cas_certificate(
    tmp_path: Path, etcd_server: EtcdServer
) -> None:
    ca_dir = tmp_path / "ca"
    fedgate = [sys.executable, "-m", "fedgate"]
    init = ["ca", "init", "--trust-domain", "east.fedgate.test", "--out", str(ca_dir)]
    subprocess.run([*fedgate, *init], check=True, capture_output=True, timeout=60)
    (tmp_path / "exports.json").write_text("[]")
    (tmp_path / "tokens.json").write_text("{}")
    webhook_port = free_port()
    argv = [
        *fedgate,
        "agent",
        "--cluster",
        "east",
        "--etcd",
        etcd_server.endpoint,
        "--ca-dir",
        str(ca_dir),
        "--ca-listen",
        free_pair(),
        "--exports",
        str(tmp_path / "exports.json"),
        "--tokens",
        str(tmp_path / "tokens.json"),
        "--gateway-tunnel",
        "127.0.0.1:15443",
        "--gateway-egress",
        "127.0.0.1:15008",
        "--admin",
        f"127.0.0.1:{free_port()}",
        "--webhook-listen",
        f"127.0.0.1:{webhook_port}",
        "--inject-config",
        str(CONFIG),
    ]
    log = (tmp_path / "agent.log").open("w")
    agent = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        roots = "".join(CaDirectory(ca_dir).state.published_pem(utcnow()))
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u1",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "namespace": "demo",
                "operation": "CREATE",
                "object": POD,
            },
        }
        status, answer = until_sync(
            lambda: _post(webhook_port, roots, json.dumps(review).encode()),
            30,
            what="the agent's webhook answering",
            ignoring=(OSError,),
        )
        assert status == 200
        response = answer["response"]
        assert isinstance(response, dict)
        assert response["allowed"] is True
        patch = json.loads(base64.b64decode(response["patch"]))
        paths = {op["path"] for op in patch}
        assert "/spec/initContainers" in paths
        assert "/metadata/annotations" in paths
        assert agent.poll() is None
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=30)
        log.close()
    assert code == 0, (tmp_path / "agent.log").read_text()[-3000:]
