"""Wiring of `fedgate agent --gateway-service <namespace>/<name>` (Kubernetes source only).

The agent follows its gateway's `LoadBalancer` Service (`clusters.kube.gateway_service`) and
republishes its `GatewayAddress.tunnel_host`/`tunnel_port` whenever the load balancer's
address changes. Until the load balancer has one, it publishes `--gateway-tunnel` when given;
without it the agent publishes nothing yet (its catalog would name no reachable gateway) and
logs that it waits. `ready` is set once an address is known: the agent's publishing starts
then.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import structlog

from clusters.agent import Agent

_log = structlog.get_logger("fedgate.agent.gateway")

Tunnel = tuple[str, int] | None


async def follow_gateway(
    changes: AsyncIterator[Tunnel],
    agent: Agent,
    fallback: Tunnel,
    ready: asyncio.Event,
    service: str,
) -> None:
    if fallback is not None:
        ready.set()  # publish the fallback until the load balancer answers
    async for tunnel in changes:
        chosen = tunnel or fallback
        if chosen is None:
            _log.warning("waiting for the gateway's load balancer address", service=service)
            continue
        gateway = agent.info.gateway
        assert gateway is not None  # the agent's wiring always builds one
        moved = replace(gateway, tunnel_host=chosen[0], tunnel_port=chosen[1])
        if moved != gateway:
            _log.info(
                "gateway address", service=service, host=chosen[0], port=chosen[1], lb=bool(tunnel)
            )
            await agent.set_info(replace(agent.info, gateway=moved))
        ready.set()


async def when_ready(ready: asyncio.Event, agent: Agent) -> None:
    await ready.wait()
    await agent.run()
