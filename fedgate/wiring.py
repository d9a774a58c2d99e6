"""Wiring: the only place concrete adapters meet (etcd, gRPC, the CA client, the components).

Each `run_*` coroutine is one fedgate process. Settings arrive parsed (fedgate/cli.py); nothing
below reads the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import uvloop
from prometheus_client import REGISTRY
from prometheus_client.core import Metric

from ca.authority import DEFAULT_SVID_TTL, CertificateAuthority, Svid
from ca.bootstrap import Bootstrap
from ca.bundle import EMPTY_BUNDLE, TrustBundle
from ca.client import Wire, obtain_svid
from ca.errors import VerificationError
from ca.naming import renew_address_for
from ca.renewal import RenewalPolicy, RenewalSchedule
from ca.verify import utcnow, verify_chain
from fedgate import admin, metrics
from mesh import codec
from mesh.model import Snapshot
from mesh.naming import controller_dns_name, controller_identity
from mesh.tasks import TaskSet

if TYPE_CHECKING:
    import grpc

    from ca.h2grpc import TlsCredentials
    from ca.service import SelfIssued

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
    svid_ttl_seconds: int = 0  # 0: the CA's maximum (default 1 h)
    ca_renew_address: str = ""  # "": the CA address's port + 1 (ca.service.renew_address_for)
    metrics_address: tuple[str, int] | None = (
        None  # a metrics-only listener (gateways; sidecars in Kubernetes)
    )
    # The gRPC client for the CA and the config stream: "h2" (issue 17: h2 + protobuf, no grpc
    # import, docs/footprint.md) or "grpcio". FEDGATE_GRPC_CLIENT sets it (fedgate/cli).
    grpc_client: Wire = "h2"

    @property
    def renew_address(self) -> str:
        return self.ca_renew_address or renew_address_for(self.ca_address)


def config_credentials(
    svid: Svid, control_root_pem: bytes, wire: Wire = "h2"
) -> grpc.ChannelCredentials | TlsCredentials:
    """The proxy's mTLS credentials for the config stream, in the form `wire`'s client takes;
    only that client's module is imported."""
    if wire == "h2":
        from ca.h2grpc import TlsCredentials

        return TlsCredentials(control_root_pem, svid.cert_pem, svid.key_pem)
    import grpc

    return grpc.ssl_channel_credentials(
        root_certificates=control_root_pem,
        private_key=svid.key_pem,
        certificate_chain=svid.cert_pem,
    )


async def run_proxy(
    w: ProxyWiring,
    proxy: Proxy,
    families: Callable[[], Iterable[Metric]] | None = None,
    stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Identity, then the config stream, then serve; `families`: the proxy's own metrics (the
    admin `/metrics` serves the process registry: these, and the data plane's request metrics);
    `stop`: how to stop on SIGTERM (default `proxy.aclose`)."""
    from federation.api.client import ConfigClient

    svid = await obtain_svid(
        w.ca_address,
        w.bootstrap.token,
        w.bootstrap.cluster_root_pem,
        w.bootstrap.trust_domain,
        ttl_seconds=w.svid_ttl_seconds,
        wire=w.grpc_client,
    )
    _log.info(
        "identity obtained",
        grpc_client=w.grpc_client,
        spiffe_id=svid.spiffe_id.uri,
        not_after=str(svid.not_after),
    )
    proxy.set_identity(svid)
    current = [svid]  # the SVID in use (renewal replaces it)
    started = False
    latest: list[Snapshot] = []
    streams: list[ConfigClient] = []  # the config client, once there is one

    def stream_status() -> dict[str, Any]:
        """The controller replica in use, and how long this proxy has trailed its version."""
        if not streams:
            return {}
        c = streams[0]
        lag = round(c.lag_seconds, 3)
        return {
            "replica": c.replica,
            "lagSeconds": lag,
            "stalls": c.stalls,
            "reconnects": c.reconnects,
        }

    state = admin.AdminState(
        ready=lambda: started,
        config=lambda: {
            "kind": w.kind,
            "node": w.node_id,
            "identity": current[0].spiffe_id.uri,
            "identityNotAfter": current[0].not_after.isoformat(),
            "identityPem": current[0].cert_pem.decode(),
            "version": latest[-1].version if latest else "",
            "configStream": stream_status(),
            "status": proxy.status(),
            "snapshot": codec.snapshot_to_json(latest[-1]) if latest else None,
        },
    )
    admin_server = await admin.serve(state, w.admin_host, w.admin_port)
    metrics_server = None
    if w.metrics_address is not None:
        only = admin.AdminState(ready=state.ready, metrics_only=True)
        metrics_server = await admin.serve(only, *w.metrics_address)

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
        credentials=config_credentials(svid, w.bootstrap.control_root_pem, w.grpc_client),
        server_name_override=controller_dns_name(),
        validate=apply,
        wire=w.grpc_client,
    )
    streams.append(client)
    tasks = TaskSet(w.kind)

    def proxy_families() -> Iterator[Metric]:
        own = current[0]
        yield from metrics.config_version_families(latest[-1].version if latest else "", w.kind)
        yield from metrics.proxy_config_families(
            client.nacks,
            client.reconnects,
            client.failovers,
            lag_seconds=client.lag_seconds,
            stalls=client.stalls,
        )
        yield from metrics.certificate_families(
            [metrics.svid_expiry(own.spiffe_id.uri, own.not_after, own.cert_pem)]
        )
        if families is not None:
            yield from families()

    collector = metrics.register(proxy_families)

    async def follow() -> None:
        nonlocal started
        # aclosing: a cancelled follow() closes the stream's channel now, not at GC.
        async with contextlib.aclosing(client.snapshots()) as snapshots:
            async for snapshot in snapshots:
                latest[:] = [snapshot]
                if not started:
                    await proxy.start()
                    started = True
                    _log.info("serving", version=snapshot.version)

    def install(new: Svid) -> None:
        proxy.set_identity(new)  # new handshakes use it; established connections keep theirs
        client.set_credentials(config_credentials(new, w.bootstrap.control_root_pem, w.grpc_client))
        current[0] = new

    tasks.spawn(follow(), "config-stream")

    def anchors() -> bytes:
        return ca_anchors(w.bootstrap, latest[-1] if latest else None)

    tasks.spawn(keep_identity(w, svid, anchors, install), "identity-renewal")
    try:
        await until_signalled()
    finally:
        REGISTRY.unregister(collector)
        await tasks.aclose()
        await (stop or proxy.aclose)()
        admin_server.close()
        if metrics_server is not None:
            metrics_server.close()


def ca_anchors(bootstrap: Bootstrap, snapshot: Snapshot | None) -> bytes:
    """Roots that may vouch for the CA's serving certificate: the bootstrap anchors plus every
    root the snapshot lists for our own trust domain (so a root rotation is followed)."""
    pem = bootstrap.cluster_root_pem
    if snapshot is not None:
        for root in snapshot.trust_bundle.get(bootstrap.trust_domain, ()):
            if root.encode() not in pem:
                pem += root.encode()
    return pem


async def keep_identity(
    w: ProxyWiring,
    first: Svid,
    anchors: Callable[[], bytes],
    install: Callable[[Svid], None],
    *,
    policy: RenewalPolicy | None = None,
    now: Callable[[], dt.datetime] = utcnow,
) -> None:
    """Renew the proxy's SVID at half life (with jitter), for ever (`ca.renewal` has the rules).

    Renewal presents the current SVID to the CA's renewal port (mTLS); once it has expired
    (the CA was unreachable for half a lifetime) the bootstrap token is used again. While the
    CA is unreachable the proxy keeps serving on the SVID it has and says how long is left."""
    schedule = RenewalSchedule(now(), first.not_after, policy)
    current = first
    log = _log.bind(spiffe_id=first.spiffe_id.uri)
    while True:
        await asyncio.sleep(schedule.delay(now()))
        if not schedule.due(now()):
            continue
        via = "token" if schedule.expired(now()) else "svid"
        try:
            new = await obtain_svid(
                w.ca_address if via == "token" else w.renew_address,
                w.bootstrap.token,
                anchors(),
                w.bootstrap.trust_domain,
                ttl_seconds=w.svid_ttl_seconds,
                attempts=1,
                current=None if via == "token" else current,
                wire=w.grpc_client,
            )
            install(new)
        except Exception as e:  # CA refusal or outage, or the proxy refusing the new SVID:
            # renewal must go on either way (asyncio.CancelledError is not an Exception).
            retry = schedule.failed(now())
            left = schedule.seconds_left(now())
            log.warning(
                "identity renewal failed" if left > 0 else "identity expired, renewal failing",
                seconds_left=round(left, 1),
                retry_in_s=round(retry, 1),
                failures=schedule.failures,
                via=via,
                error=str(e),
            )
            continue
        current = new
        schedule.renewed(now(), new.not_after)
        log.info(
            "identity renewed",
            via=via,
            not_after=new.not_after.isoformat(),
            next_renewal_in_s=round(schedule.delay(now()), 1),
        )


# --- controller ---------------------------------------------------------------------------


def snapshot_bundle(snapshot: Snapshot | None) -> TrustBundle:
    """The federated bundle and deny list of `snapshot` (empty before the first)."""
    if snapshot is None:
        return EMPTY_BUNDLE
    return TrustBundle.from_pem(snapshot.trust_bundle).with_denied(snapshot.denied)


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


def run_with_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop (a dependency: what fedgate runs and the proxy tests also use)."""
    uvloop.run(main)


def controller_svid(
    ca: CertificateAuthority,
    ttl: dt.timedelta = DEFAULT_SVID_TTL,
    now: Callable[[], dt.datetime] = utcnow,
) -> SelfIssued:
    """The controller's serving identity, issued in-process by the control-plane CA and
    re-issued at half life (pulled by new handshakes, see `ca.service.SelfIssued`)."""
    from ca.service import SelfIssued

    def issue(at: dt.datetime) -> Svid:
        return ca.issue(
            controller_identity(ca.trust_domain), at, ttl=ttl, dns_names=(controller_dns_name(),)
        )

    return SelfIssued(issue, now=now)
