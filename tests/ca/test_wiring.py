"""The identity wiring of fedgate/: renewal loop against a real CA, what a workload does while
its CA is unreachable, the controller's self-renewing serving certificate, and the controller's
peer check refusing every bad certificate with its reason."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from structlog.testing import LogCapture

from ca.api import ca_pb2, ca_pb2_grpc
from ca.authority import CertificateAuthority, Svid
from ca.bootstrap import Bootstrap
from ca.bundle import TrustBundle
from ca.client import obtain_svid
from ca.renewal import RenewalPolicy
from ca.service import SignServicer, serve
from ca.verify import utcnow
from fedgate.processes import controller_credentials
from fedgate.wiring import ProxyWiring, authorize_peer, controller_svid, keep_identity
from mesh.naming import SpiffeId
from tests.ca.conftest import free_pair
from tests.helpers import until
from tests.wires import wire  # noqa: F401  (the fixture)

TD = "east.fedgate.local"
ECHO = SpiffeId(TD, "demo", "echo")
FAST = RenewalPolicy(fraction=0.08, jitter=0.02, retry_initial=0.1, retry_max=0.3)


def wiring(ca: CertificateAuthority, addr: str, ttl: int = 10) -> ProxyWiring:
    boot = Bootstrap("tok", ca.root_pem, ca.root_pem, TD)
    return ProxyWiring("sidecar", "p.east", "east", boot, addr, "unused:1", "127.0.0.1", 0, ttl)


def named(logs: LogCapture, event: str) -> list[dict[str, Any]]:
    return [dict(e) for e in logs.entries if e["event"] == event]


@pytest.mark.usefixtures("wire")
async def test_keep_identity_renews_repeatedly_with_the_current_svid(logs: LogCapture) -> None:
    ca = CertificateAuthority.create(TD, utcnow())
    addr = free_pair()
    server = await serve(ca, {"tok": ECHO}.get, addr)
    installed: list[Svid] = []
    try:
        w = wiring(ca, addr)
        first = await obtain_svid(addr, "tok", ca.root_pem, TD, ttl_seconds=10)
        task = asyncio.create_task(
            keep_identity(w, first, lambda: ca.root_pem, installed.append, policy=FAST)
        )
        try:
            await until(lambda: len(installed) >= 3, 15)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await server.stop(None)
    serials = {x509.load_pem_x509_certificate(s.cert_pem).serial_number for s in installed}
    assert len(serials) == len(installed)  # each renewal is a new certificate ...
    assert {s.spiffe_id for s in installed} == {ECHO}  # ... of the same identity
    assert len({s.key_pem for s in [first, *installed]}) == len(installed) + 1  # new keys
    renewed = named(logs, "identity renewed")
    assert len(renewed) >= 3
    assert {e["via"] for e in renewed} == {"svid"}
    assert len(named(logs, "svid renewed")) >= 3  # the CA saw renewals, not token issuances


@pytest.mark.usefixtures("wire")
async def test_unreachable_ca_keeps_the_svid_logs_time_left_then_recovers(
    logs: LogCapture,
) -> None:
    ca = CertificateAuthority.create(TD, utcnow())
    addr = free_pair()
    first = ca.issue(ECHO, utcnow(), ttl=dt.timedelta(seconds=10))
    installed: list[Svid] = []
    task = asyncio.create_task(
        keep_identity(wiring(ca, addr), first, lambda: ca.root_pem, installed.append, policy=FAST)
    )
    try:
        await until(lambda: len(named(logs, "identity renewal failed")) >= 2, 10)
        warning = named(logs, "identity renewal failed")[0]
        assert 0 < warning["seconds_left"] <= 10
        assert warning["log_level"] == "warning"
        assert installed == []  # still serving on `first`
        server = await serve(ca, {"tok": ECHO}.get, addr)  # the CA comes back
        try:
            await until(lambda: installed, 10)
        finally:
            await server.stop(None)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert installed[0].spiffe_id == ECHO


@pytest.mark.usefixtures("wire")
async def test_an_expired_svid_is_replaced_through_the_bootstrap_token(logs: LogCapture) -> None:
    ca = CertificateAuthority.create(TD, utcnow())
    addr = free_pair()
    first = ca.issue(ECHO, utcnow(), ttl=dt.timedelta(seconds=1))
    installed: list[Svid] = []
    task = asyncio.create_task(
        keep_identity(wiring(ca, addr), first, lambda: ca.root_pem, installed.append, policy=FAST)
    )
    try:
        await until(
            lambda: any(
                e["seconds_left"] < 0 for e in named(logs, "identity expired, renewal failing")
            ),
            10,
        )
        server = await serve(ca, {"tok": ECHO}.get, addr)
        try:
            await until(lambda: installed, 10)
        finally:
            await server.stop(None)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert named(logs, "identity renewed")[0]["via"] == "token"


# --- controller ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = utcnow()

    def __call__(self) -> dt.datetime:
        return self.t


async def test_controller_certificate_renews_for_new_handshakes_only() -> None:
    control = CertificateAuthority.create("fedgate.local", utcnow())
    clock = Clock()
    identity = controller_svid(control, ttl=dt.timedelta(minutes=6), now=clock)
    first = identity.svid
    client_ca = CertificateAuthority.create(TD, utcnow())
    client = client_ca.issue(ECHO, utcnow())

    server = grpc.aio.server()
    ca_pb2_grpc.add_CertificateAuthorityServicer_to_server(SignServicer(client_ca, {}.get), server)
    creds = controller_credentials(identity, control.root_pem + client_ca.root_pem, lambda: None)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()

    def channel() -> grpc.aio.Channel:
        c = grpc.ssl_channel_credentials(control.root_pem, client.key_pem, client.cert_pem)
        opts = [("grpc.ssl_target_name_override", "controller.fedgate.local")]
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", c, options=opts)

    async def served_by(ch: grpc.aio.Channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:  # any answer proves the handshake
            await ca_pb2_grpc.CertificateAuthorityStub(ch).Sign(ca_pb2.SignRequest(), timeout=5)
        assert info.value.code() != grpc.StatusCode.UNAVAILABLE

    try:
        old = channel()
        await served_by(old)
        # Past half life (within the 5 min back-dating, so the new one is valid in real time).
        clock.t += dt.timedelta(minutes=3.5)
        new = channel()
        await served_by(new)
        assert identity.svid.cert_pem != first.cert_pem
        await served_by(old)  # the established connection keeps working
        await old.close()
        await new.close()
    finally:
        await server.stop(None)


def _ctx(pem: bytes | None) -> Any:
    class Ctx:
        def auth_context(self) -> dict[str, list[bytes]]:
            return {"x509_pem_cert": [pem]} if pem else {}

    return Ctx()


def test_controller_peer_check_refuses_each_bad_certificate_with_its_reason(
    tmp_path: Path,
) -> None:
    now = utcnow()
    east = CertificateAuthority.create(TD, now)
    west = CertificateAuthority.create("west.fedgate.local", now)
    bundle = TrustBundle.from_pem({TD: [east.root_pem], west.trust_domain: [west.root_pem]})
    denied = bundle.with_denied([ECHO.uri])
    good = east.issue(SpiffeId(TD, "demo", "client"), now)
    expired = east.issue(ECHO, now - dt.timedelta(hours=2), ttl=dt.timedelta(minutes=1))
    foreign = CertificateAuthority.create(TD, now).issue(ECHO, now)
    mismatch = CertificateAuthority(TD, west._key, west.root).issue(ECHO, now)
    raw = bytearray(x509.load_pem_x509_certificate(good.cert_pem).public_bytes(Encoding.DER))
    raw[-12] ^= 0x01  # a flipped signature bit
    tampered = x509.load_der_x509_certificate(bytes(raw)).public_bytes(Encoding.PEM)
    check = authorize_peer(lambda: bundle)
    assert check(_ctx(good.cert_pem)) is None
    assert "expired" in str(check(_ctx(expired.cert_pem)))
    assert "not signed by any root" in str(check(_ctx(foreign.cert_pem)))
    assert "not signed by any root" in str(check(_ctx(mismatch.cert_pem)))
    assert "not signed by any root" in str(check(_ctx(tampered)))
    assert check(_ctx(None)) == "no client certificate"
    on_deny_list = authorize_peer(lambda: denied)(_ctx(east.issue(ECHO, now).cert_pem))
    assert "deny list" in str(on_deny_list)
