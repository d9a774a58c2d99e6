"""The sidecar injector's part of the install: the agent serves the admission webhook
(`clusters/inject/`, docs/kubernetes.md "Sidecar injection"); this module renders what it needs
around it.

- the ConfigMap `fedgate-inject` with the injector's settings (`fedgate.inject_config`'s
  camelCase keys), mounted into the agent and read with `--inject-config`;
- the Service `fedgate-agent` in front of the webhook (443 -> 15017): the webhook's certificate
  names `fedgate-agent.fedgate-system.svc`;
- the `MutatingWebhookConfiguration`, from the injector's own pure function
  (`clusters.inject.admission.webhook_configuration`), so both sides agree on its name, path,
  selector and `failurePolicy: Ignore`.
"""

from __future__ import annotations

import yaml

from clusters.inject.admission import webhook_configuration
from fedgate.manifests.common import Obj, meta, obj, port, service, service_port
from fedgate.manifests.settings import (
    AGENT,
    CA_PORT,
    CA_SERVICE,
    INJECT_CONFIGMAP,
    NAMESPACE,
    WEBHOOK_PORT,
    ManifestSettings,
    in_cluster,
)

INJECT_DIR = "/etc/fedgate/inject"
INJECT_FILE = "inject.yaml"
WEBHOOK_SERVICE_PORT = 443


def inject_settings(settings: ManifestSettings) -> dict[str, str]:
    """What the injected sidecars are configured with, in this cluster."""
    return {
        "cluster": settings.cluster,
        "controllerAddress": settings.controller_address,
        "caAddress": in_cluster(CA_SERVICE, CA_PORT),
        "image": settings.image,
        "clusterDNS": settings.cluster_dns,
    }


def agent_args() -> list[str]:
    return [
        f"--webhook-listen=0.0.0.0:{WEBHOOK_PORT}",
        f"--webhook-service={AGENT}.{NAMESPACE}",
        f"--inject-config={INJECT_DIR}/{INJECT_FILE}",
    ]


def agent_port() -> Obj:
    return port("https-webhook", WEBHOOK_PORT)


def agent_volume() -> Obj:
    return {"name": "inject", "configMap": {"name": INJECT_CONFIGMAP}}


def agent_mount() -> Obj:
    return {"name": "inject", "mountPath": INJECT_DIR, "readOnly": True}


def objects(settings: ManifestSettings) -> list[Obj]:
    text = yaml.safe_dump(inject_settings(settings), sort_keys=False)
    webhook = service(
        AGENT,
        [{**service_port("https-webhook", WEBHOOK_SERVICE_PORT), "targetPort": WEBHOOK_PORT}],
        AGENT,
    )
    configuration = webhook_configuration(
        settings.ca_bundle, AGENT, NAMESPACE, WEBHOOK_SERVICE_PORT
    )
    return [
        obj("v1", "ConfigMap", meta(INJECT_CONFIGMAP), data={INJECT_FILE: text}),
        webhook,
        configuration,
    ]
