"""AuthorizationPolicy at the destination sidecar, on loopback with real sidecars and mTLS.

The client is http.client through the source sidecar; the destination sidecars run the policies
of the snapshot (`sidecar.inbound`, `sidecar.inbound_gate`). The rig-level e2e
(tests/e2e/test_authz.py) covers HTTP/2, gRPC and TCP through gateways.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator

import pytest

from mesh.model import (
    AuthorizationPolicy,
    AuthorizationRule,
    AuthzOperation,
    AuthzSource,
    ClusterWeight,
    TrafficPolicy,
)
from tests.sidecar.conftest import Logs, Pki
from tests.sidecar.http_rig import SVC, HttpRig, Reply, start_http_rig, stop_http_rig
from tests.sidecar.test_h2_proxy import h2_rig

CLIENT = "spiffe://east.fedgate.local/ns/shop/sa/client"
LOCAL = TrafficPolicy(SVC, cluster_weights=(ClusterWeight("local", 100),))


@pytest.fixture
async def rig(pki: Pki, logs: Logs) -> AsyncIterator[HttpRig]:
    r = await start_http_rig(pki, [("east", "a", {})])
    try:
        yield r
    finally:
        await stop_http_rig(r)


def deny_private() -> AuthorizationPolicy:
    rule = AuthorizationRule(
        (AuthzSource((CLIENT,)),), (AuthzOperation(paths=("/private/*",), methods=("GET",)),)
    )
    return AuthorizationPolicy("no-private", SVC, "DENY", (rule,))


def allow_only(principal: str) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        "only", SVC, "ALLOW", (AuthorizationRule((AuthzSource((principal,)),)),)
    )


async def test_each_request_of_a_keep_alive_connection_is_decided(rig: HttpRig, logs: Logs) -> None:
    rig.apply(LOCAL, authorization=[deny_private()])

    def calls() -> list[Reply]:
        conn = rig.connection()
        try:
            return [
                rig.call("/public", conn=conn),
                rig.call("/private/x", conn=conn),
                rig.call("/private/x", method="POST", body=b"x" * 70_000, conn=conn),
                rig.call("/public", conn=conn),
            ]
        finally:
            conn.close()

    first, denied, posted, again = await asyncio.to_thread(calls)
    assert (first.status, denied.status, posted.status, again.status) == (200, 403, 200, 200)
    assert denied.headers["x-fedgate-reason"] == "denied by authorization policy shop/no-private"
    assert b"GET /private/x" in denied.body
    inbound = rig.pod("a").sidecar.inbound
    assert dict(inbound.denials) == {
        (SVC.fqdn, "denied by authorization policy shop/no-private"): 1
    }
    [line] = [e for e in logs if e["event"] == "inbound request denied"]
    assert (line["method"], line["path"], line["policy"]) == (
        "GET",
        "/private/x",
        "shop/no-private",
    )


async def test_a_policy_change_applies_to_the_next_request_on_pooled_connections(
    rig: HttpRig,
) -> None:
    rig.apply(LOCAL)
    assert [r.status for r in await rig.many(3)] == [200] * 3
    opened = rig.source.outbound.http.pool.opened
    rig.apply(LOCAL, authorization=[allow_only("spiffe://west.fedgate.local/ns/shop/sa/client")])
    refused = await rig.many(2)
    assert [(r.status, r.headers.get("x-fedgate-reason")) for r in refused] == [
        (403, "no ALLOW policy matched")
    ] * 2
    assert rig.source.outbound.http.pool.opened >= opened
    rig.apply(LOCAL, authorization=[allow_only(CLIENT)])
    assert [r.status for r in await rig.many(3)] == [200] * 3


async def test_without_policies_nothing_is_gated(rig: HttpRig) -> None:
    rig.apply(LOCAL)
    replies = await rig.many(5, path="/private/x")
    assert [r.status for r in replies] == [200] * 5
    assert not rig.pod("a").sidecar.inbound.denials


async def test_http2_streams_are_decided_each_with_a_403_and_reason(pki: Pki) -> None:
    rig, apps = await h2_rig(pki, "HTTP2")
    try:
        rig.apply(LOCAL, authorization=[deny_private()])
        host, port = rig.source.outbound.address

        def one(path: str) -> tuple[str, str]:
            fmt = "%{http_code} %{http_version} %header{x-fedgate-reason}"
            argv = ["curl", "-sS", "--http2-prior-knowledge", "--path-as-is", "-o", "/dev/null"]
            argv += ["-H", "host: api.shop.svc.clusterset.local", "-w", fmt]
            res = subprocess.run(
                [*argv, f"http://{host}:{port}{path}"],
                capture_output=True,
                text=True,
                timeout=15,
                check=False,
            )
            assert res.returncode == 0, res.stderr
            code, version, reason = f"{res.stdout}  ".split(" ", 2)
            return f"{code} {version}", reason.strip()

        for path, want in (
            ("/public", ("200 2", "")),
            ("/private/x", ("403 2", "denied by authorization policy shop/no-private")),
            ("/a/../private/y", ("403 2", "denied by authorization policy shop/no-private")),
            ("/public/again", ("200 2", "")),
        ):
            assert await asyncio.to_thread(one, path) == want, path
        # Each refused stream counted once, at the destination that refused it.
        denied = sum(sum(p.sidecar.inbound.denials.values()) for p in rig.pods)
        assert denied == 2
    finally:
        await stop_http_rig(rig)
        apps.stop()
