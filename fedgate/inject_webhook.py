"""Wiring of the sidecar-injection webhook inside the agent (`fedgate agent --webhook-listen`).

The agent's own CA issues the webhook's certificate: SPIFFE ID
`spiffe://<trust-domain>/ns/<namespace>/sa/<service>` with the DNS SANs the API server dials,
`<service>.<namespace>.svc` (and `.svc.cluster.local`), for the CA's longest SVID lifetime. It is
reissued at half life into the same TLS context, so new connections get the new certificate and
nothing restarts. The `MutatingWebhookConfiguration`'s `caBundle` holds the cluster's published
roots (`clusters.inject.admission.webhook_configuration`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from ca.authority import Svid
from ca.service import CaView
from ca.tls import load_svid, webhook_server_context
from ca.verify import utcnow
from clusters.inject.admission import service_dns_names
from clusters.inject.webhook import WebhookServer
from fedgate import inject_config
from fedgate.wiring import parse_hostport
from mesh.naming import SpiffeId
from mesh.tasks import TaskSet

_log = structlog.get_logger("fedgate.inject")


@dataclass(frozen=True, slots=True)
class WebhookOptions:
    """`listen`: host:port ("" = no webhook); `service`, `namespace`: the Service in front of
    the agent (the certificate's names); `config`: the injector settings file."""

    listen: str = ""
    service: str = "fedgate-agent"
    namespace: str = "fedgate-system"
    config: Path | None = None


def issue_certificate(view: CaView, options: WebhookOptions, now: dt.datetime) -> Svid:
    spiffe_id = SpiffeId(view.issuer.trust_domain, options.namespace, options.service)
    names = service_dns_names(options.service, options.namespace)
    return view.issuer.issue(spiffe_id, now, view.max_ttl, dns_names=names)


async def start(
    options: WebhookOptions, cluster: str, view: Callable[[], CaView], tasks: TaskSet
) -> WebhookServer:
    """Serve the webhook (its certificate renewed by a task in `tasks`)."""
    try:
        settings = inject_config.load(options.config, cluster=cluster)
    except ValueError as e:
        raise SystemExit(f"fedgate: --inject-config: {e}") from e
    svid = issue_certificate(view(), options, utcnow())
    context = webhook_server_context(svid)
    server = WebhookServer(lambda: settings)
    host, port = parse_hostport(options.listen)
    await server.start(host, port, context)

    async def renew(current: Svid) -> None:
        while True:
            half = (current.not_after - utcnow()) / 2
            await asyncio.sleep(max(half.total_seconds(), 1.0))
            current = issue_certificate(view(), options, utcnow())
            load_svid(context, current)
            _log.info("webhook certificate renewed", not_after=current.not_after.isoformat())

    tasks.spawn(renew(svid), "webhook-certificate")
    return server
