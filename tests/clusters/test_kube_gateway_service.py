"""The agent follows its gateway's LoadBalancer Service (fake API server, real etcd): the
address the load balancer gains is published, a changed one republished, and until there is
one the agent publishes `--gateway-tunnel`, or nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from clusters.agent import Agent
from clusters.kube.gateway_service import GatewayServiceWatcher, parse_service_ref
from clusters.kube.source import KubeClusterSource
from federation import keys
from federation.store import EtcdCatalogPublisher
from fedgate.agent_gateway import follow_gateway, when_ready
from mesh.codec import cluster_from_json
from mesh.model import ClusterInfo, GatewayAddress
from tests import helpers
from tests.clusters.kube_rig import FAST, TD, until, write_kubeconfig
from tests.kubefake import FakeKubeAPI
from tests.kubefake.resources import SERVICES

NS, NAME = "fedgate-system", "fedgate-gateway"


def gateway_service() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "type": "LoadBalancer",
            "selector": {"app": NAME},
            "ports": [{"name": "tls", "port": 15443, "protocol": "TCP", "targetPort": 15443}],
        },
    }


def set_ingress(api: FakeKubeAPI, *entries: dict[str, str]) -> None:
    svc = api.store.get(SERVICES, NS, NAME)
    svc["status"] = {"loadBalancer": {"ingress": list(entries)}}
    api.store.update(SERVICES, svc, subresource="status")


async def published(etcd: Any) -> tuple[str, int] | None:
    found = await etcd.kv.get(keys.info_key("east"))
    if not found.kvs:
        return None
    gw = cluster_from_json(json.loads(found.kvs[0].value)).gateway
    assert gw is not None
    return gw.tunnel_host, gw.tunnel_port


@contextlib.asynccontextmanager
async def agent(
    tmp_path: Path, api: FakeKubeAPI, etcd: Any, fallback: tuple[str, int] | None
) -> AsyncIterator[tuple[GatewayServiceWatcher, asyncio.Event]]:
    config = write_kubeconfig(tmp_path / "kubeconfig", api.url)
    source = KubeClusterSource.from_kubeconfig(config, "east", TD, settings=FAST, debounce=0.05)
    watcher = GatewayServiceWatcher(
        source.api_client, *parse_service_ref(f"{NS}/{NAME}"), settings=FAST
    )
    host, port = fallback or ("", 0)
    info = ClusterInfo("east", TD, GatewayAddress(host, port, "10.0.0.9", 15008, "tls"), ())
    publisher = EtcdCatalogPublisher(etcd, "east", ttl=5)
    the_agent = Agent(info, source, publisher, retry_interval=0.1)
    ready = asyncio.Event()
    tasks = [
        asyncio.create_task(
            follow_gateway(watcher.changes(), the_agent, fallback, ready, f"{NS}/{NAME}")
        ),
        asyncio.create_task(when_ready(ready, the_agent)),
    ]
    try:
        yield watcher, ready
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await publisher.aclose()
        source.close()


async def until_published(etcd: Any, want: tuple[str, int]) -> None:
    async def probe() -> tuple[str, int] | None:
        return await published(etcd)

    got: tuple[str, int] | None = await helpers.until(
        probe, 10.0, check=lambda v: v == want, what=f"{want} in etcd"
    )
    assert got == want


async def test_the_load_balancers_hostname_is_published_and_followed(
    tmp_path: Path, etcd: Any
) -> None:
    with FakeKubeAPI() as api:
        api.store.create(SERVICES, gateway_service())
        async with agent(tmp_path, api, etcd, None) as (watcher, ready):
            await until(lambda: watcher.updates >= 1, "the Service listed")
            # No address yet and no fallback: nothing is published.
            assert watcher.current is None
            assert not ready.is_set()
            assert await published(etcd) is None
            set_ingress(api, {"hostname": "GW-East.elb.Example.com"})
            await until_published(etcd, ("gw-east.elb.example.com", 15443))
            set_ingress(api, {"ip": "203.0.113.9", "hostname": "ignored.example.com"})
            await until_published(etcd, ("203.0.113.9", 15443))


async def test_the_fallback_is_published_until_the_load_balancer_answers(
    tmp_path: Path, etcd: Any
) -> None:
    with FakeKubeAPI() as api:
        api.store.create(SERVICES, gateway_service())
        async with agent(tmp_path, api, etcd, ("198.51.100.7", 15443)) as (watcher, _):
            await until_published(etcd, ("198.51.100.7", 15443))
            set_ingress(api, {"hostname": "gw.example.net"})
            await until_published(etcd, ("gw.example.net", 15443))
            # The load balancer loses its address: back to the fallback.
            set_ingress(api)
            await until_published(etcd, ("198.51.100.7", 15443))
            assert watcher.current is None


def test_a_gateway_service_is_namespace_slash_name() -> None:
    assert parse_service_ref("fedgate-system/fedgate-gateway") == (NS, NAME)
    for bad in ("fedgate-gateway", "/x", "ns/", "a/b/c"):
        with pytest.raises(ValueError, match="namespace"):
            parse_service_ref(bad)
