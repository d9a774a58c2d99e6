"""Wiring: the only place concrete adapters meet (etcd, gRPC, the CA client, the components).

Each `run_*` coroutine is one fedgate process. Settings arrive parsed (fedgate/cli.py); nothing
below reads the environment.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import structlog

from ca.authority import CertificateAuthority, Svid
from ca.bootstrap import Bootstrap
from ca.bundle import TrustBundle
from ca.client import obtain_svid
from ca.errors import VerificationError
from ca.verify import utcnow, verify_chain
from fedgate import admin
from mesh import codec
from mesh.model import Snapshot
from mesh.naming import controller_dns_name, controller_identity
from mesh.tasks import TaskSet

_log = structlog.get_logger("fedgate")


async def until_signalled() -> None:
    """Block until SIGTERM or SIGINT: every process shuts down the same way."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"fedgate: {text!r} is not host:port")
    return host, int(port)


# --- proxies (sidecar, gateway): identity first, then config --------------------------------


class Proxy(Protocol):
    def set_identity(self, svid: Svid) -> None: ...
    def apply(self, snapshot: Snapshot) -> None: ...
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    def status(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class ProxyWiring:
    kind: str  # "sidecar" | "gateway"
    node_id: str
    cluster: str
    bootstrap: Bootstrap
    ca_address: str
    controller_address: str
    admin_host: str
    admin_port: int
    svid_ttl_seconds: int = 0


def config_credentials(svid: Svid, control_root_pem: bytes) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=control_root_pem,
        private_key=svid.key_pem,
        certificate_chain=svid.cert_pem,
    )


async def run_proxy(w: ProxyWiring, proxy: Proxy) -> None:
    from federation.api.client import ConfigClient

    svid = await obtain_svid(
        w.ca_address,
        w.bootstrap.token,
        w.bootstrap.cluster_root_pem,
        w.bootstrap.trust_domain,
        ttl_seconds=w.svid_ttl_seconds,
    )
    _log.info("identity obtained", spiffe_id=svid.spiffe_id.uri, not_after=str(svid.not_after))
    proxy.set_identity(svid)
    started = False
    latest: list[Snapshot] = []
    state = admin.AdminState(
        ready=lambda: started,
        config=lambda: {
            "kind": w.kind,
            "node": w.node_id,
            "identity": svid.spiffe_id.uri,
            "identityNotAfter": svid.not_after.isoformat(),
            "version": latest[-1].version if latest else "",
            "status": proxy.status(),
            "snapshot": codec.snapshot_to_json(latest[-1]) if latest else None,
        },
    )
    admin_server = await admin.serve(state, w.admin_host, w.admin_port)

    def apply(snapshot: Snapshot) -> None:
        # Applying is validating: a snapshot the proxy rejects is NACKed with the reason and
        # the proxy keeps running on its last good config.
        try:
            proxy.apply(snapshot)
        except Exception as e:
            raise ValueError(f"{type(e).__name__}: {e}") from e

    client = ConfigClient(
        w.controller_address,
        node_id=w.node_id,
        cluster=w.cluster,
        kind=w.kind,
        credentials=config_credentials(svid, w.bootstrap.control_root_pem),
        server_name_override=controller_dns_name(),
        validate=apply,
    )
    tasks = TaskSet(w.kind)

    async def follow() -> None:
        nonlocal started
        async for snapshot in client.snapshots():
            latest[:] = [snapshot]
            if not started:
                await proxy.start()
                started = True
                _log.info("serving", version=snapshot.version)

    tasks.spawn(follow(), "config-stream")
    try:
        await until_signalled()
    finally:
        await tasks.aclose()
        await proxy.aclose()
        admin_server.close()


# --- controller ---------------------------------------------------------------------------


def _peer_pem(context: grpc.aio.ServicerContext[Any, Any]) -> bytes | None:
    pems = list(context.auth_context().get("x509_pem_cert", ()))
    return pems[0] if pems else None


def authorize_peer(bundle: Callable[[], TrustBundle]) -> Callable[[Any], str | None]:
    """gRPC peers are checked by OpenSSL against every root; this adds SPIFFE scoping."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    def check(context: Any) -> str | None:
        pem = _peer_pem(context)
        if pem is None:
            return "no client certificate"
        try:
            der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
            spiffe_id = verify_chain([der], bundle(), utcnow())
        except (VerificationError, ValueError) as e:
            return f"refused: {e}"
        _log.debug("config client authenticated", spiffe_id=spiffe_id.uri)
        return None

    return check


def run_with_loop(main: Awaitable[None]) -> None:
    try:
        import uvloop

        uvloop.run(main)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep a plain fallback
        asyncio.run(main)  # type: ignore[arg-type]


def controller_svid(ca: CertificateAuthority) -> Svid:
    return ca.issue(
        controller_identity(ca.trust_domain),
        utcnow(),
        ttl=dt.timedelta(days=1),
        dns_names=(controller_dns_name(),),
    )
