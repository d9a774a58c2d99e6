"""Run as a child interpreter by tests/fedgate/test_footprint.py: a sidecar's start-up path
(the CLI module, fedgate.processes, its telemetry set-up and a started `Sidecar`), then print
which modules the process holds. A child, because the test process itself imports everything.

    python -m tests.fedgate.startup_child [OTLP_ENDPOINT]
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys

import fedgate.cli  # noqa: F401  (every fedgate process starts through the CLI module)
from fedgate import processes
from fedgate.telemetry import TelemetrySettings


async def sidecar(otlp_endpoint: str) -> bool:
    """Start a sidecar as `fedgate sidecar` does (processes._sidecar, minus the identity and
    config wiring that need a CA and a controller); whether its telemetry traces."""
    from ca.authority import CertificateAuthority
    from ca.bundle import TrustBundle
    from sidecar.settings import SidecarSettings
    from sidecar.sidecar import Sidecar

    ca = CertificateAuthority.create("east.fedgate.local", dt.datetime.now(dt.UTC))
    anchors = TrustBundle.from_pem({ca.trust_domain: [ca.root_pem]})
    settings = SidecarSettings(
        cluster="east",
        pod="p",
        namespace="demo",
        outbound_host="127.0.0.1",
        inbound_host="127.0.0.1",
        outbound_port=0,
        inbound_port=0,
        dns_port=0,
    )
    tel = TelemetrySettings("fedgate-sidecar", "p.east", "east", otlp_endpoint)
    async with processes._telemetry(tel) as t:
        proxy = Sidecar(settings, anchors, telemetry=t)
        await proxy.start()
        await proxy.aclose()
        return t.tracing


if __name__ == "__main__":
    tracing = asyncio.run(sidecar(sys.argv[1] if len(sys.argv) > 1 else ""))
    print(json.dumps({"tracing": tracing, "modules": sorted(sys.modules)}))
