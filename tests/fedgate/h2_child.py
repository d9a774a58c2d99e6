"""Run as a child interpreter by tests/fedgate/test_footprint_h2.py: a proxy's identity and
config path with the h2 gRPC client, against the real CA and controller servers the parent
runs (grpcio, unmodified); then print which modules the process holds.

    python -m tests.fedgate.h2_child CA_ADDRESS CONTROLLER_ADDRESS DIR

DIR holds cluster-root.pem and control-root.pem; the join token is "t".
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

# Every fedgate process starts through the CLI module, a sidecar through fedgate.processes.
import fedgate.cli
import fedgate.processes  # noqa: F401  (the sidecar command's module)
import gateway.gateway  # noqa: F401  (a gateway takes the same path)
import sidecar.sidecar  # noqa: F401
from ca.client import obtain_svid
from federation.api.client import ConfigClient
from fedgate.wiring import config_credentials
from mesh.naming import controller_dns_name


async def main(ca_address: str, controller: str, folder: Path) -> dict[str, object]:
    svid = await obtain_svid(
        ca_address, "t", (folder / "cluster-root.pem").read_bytes(), "east.fedgate.local", wire="h2"
    )
    control_root = (folder / "control-root.pem").read_bytes()
    client = ConfigClient(
        controller,
        node_id="sidecar-1",
        cluster="east",
        credentials=config_credentials(svid, control_root, "h2"),
        server_name_override=controller_dns_name(),
        wire="h2",
    )
    stream = client.snapshots()
    try:
        snapshot = await asyncio.wait_for(anext(stream), 20.0)
    finally:
        await stream.aclose()
    return {"identity": svid.spiffe_id.uri, "version": snapshot.version}


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
    print(json.dumps({**result, "modules": sorted(sys.modules)}))
