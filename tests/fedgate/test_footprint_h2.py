"""A proxy (sidecar or gateway) using the h2 gRPC client (issue 17) never imports grpc, yet
obtains its SVID from the real CA and its config from the real controller (grpcio servers)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from ca.authority import CertificateAuthority
from ca.service import serve as serve_ca
from ca.verify import utcnow
from mesh.naming import SpiffeId
from tests.helpers import free_port
from tests.wires import tls_config_server

ROOT = Path(__file__).resolve().parents[2]
ECHO = SpiffeId("east.fedgate.local", "demo", "echo")


async def test_a_proxy_on_the_h2_client_gets_identity_and_config_without_grpc(
    tmp_path: Path,
) -> None:
    east = CertificateAuthority.create("east.fedgate.local", utcnow())
    ca_address = f"127.0.0.1:{free_port()}"
    ca_server = await serve_ca(east, {"t": ECHO}.get, ca_address, renew_listen="127.0.0.1:0")
    controller, control_root = await tls_config_server(east.root_pem)
    (tmp_path / "cluster-root.pem").write_bytes(east.root_pem)
    (tmp_path / "control-root.pem").write_bytes(control_root)
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.fedgate.h2_child",
            ca_address,
            f"127.0.0.1:{controller.port}",
            str(tmp_path),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(child.communicate(), 120)
    finally:
        await controller.stop(None)
        await ca_server.stop(None)
    assert child.returncode == 0
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["identity"] == ECHO.uri
    assert result["version"]
    modules = result["modules"]
    assert "sidecar.sidecar" in modules
    assert "gateway.gateway" in modules
    assert "ca.h2grpc" in modules  # it did speak gRPC, over h2
    assert [m for m in modules if m == "grpc" or m.startswith(("grpc.", "grpc_"))] == []
