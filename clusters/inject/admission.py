"""The admission webhook, pure: AdmissionReview v1 in, AdmissionReview v1 out; and its
`MutatingWebhookConfiguration`.

`review` answers a Pod CREATE with the JSON Patch (`patchType: JSONPatch`, base64) that
`objects.inject_object` makes of the pod, the same computation `fedgate inject` runs, so the
webhook and the CLI cannot drift. The webhook never denies: a pod that is opted out or already
injected gets no patch, and one that cannot be injected (`hostNetwork`) is admitted unchanged
with the reason as an admission warning, which `kubectl` prints (Linkerd's injector also admits
what it skips). A request that is not an AdmissionReview v1 raises `AdmissionError` (the driver
answers 400).

`webhook_configuration` is the `MutatingWebhookConfiguration` the manifests install: pods
CREATE in namespaces labelled `fedgate.io/inject=enabled`, `failurePolicy: Ignore` (an outage of
the webhook never blocks deploys: pods start uninjected), `sideEffects: None`,
`admissionReviewVersions: [v1]`, served by the agent's Service over HTTPS with a certificate of
the cluster's CA, whose roots are the `caBundle`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from clusters.inject.objects import InjectRefusedError, inject_object
from clusters.inject.patch import diff
from clusters.inject.spec import InjectSettings, Json

API_VERSION = "admission.k8s.io/v1"
WEBHOOK_PATH = "/inject"
WEBHOOK_NAME = "sidecar-injector.fedgate.io"
CONFIGURATION_NAME = "fedgate-sidecar-injector"
NAMESPACE_LABEL = "fedgate.io/inject"


class AdmissionError(ValueError):
    """The request is not an AdmissionReview v1 this webhook can answer."""


def review(body: Mapping[str, Any], s: InjectSettings) -> Json:
    """The AdmissionReview answering `body`."""
    if body.get("apiVersion") != API_VERSION or body.get("kind") != "AdmissionReview":
        raise AdmissionError(
            f"expected an AdmissionReview {API_VERSION}, got {body.get('kind')} "
            f"{body.get('apiVersion')}"
        )
    request = body.get("request")
    if not isinstance(request, Mapping) or not request.get("uid"):
        raise AdmissionError("the AdmissionReview has no request.uid")
    response: Json = {"uid": request["uid"], "allowed": True}
    pod = request.get("object")
    kind = request.get("kind")
    is_pod = isinstance(kind, Mapping) and kind.get("kind") == "Pod"
    if request.get("operation") == "CREATE" and is_pod and isinstance(pod, Mapping):
        namespace = str(request.get("namespace") or "default")
        try:
            outcome = inject_object(pod, namespace, s)
        except InjectRefusedError as e:
            response["warnings"] = [f"fedgate: not injected: {e}"]
        except (AttributeError, TypeError, KeyError) as e:
            # A field of the wrong JSON type: the API server never sends one, a bad peer might.
            raise AdmissionError(f"malformed Pod in the review: {e!r}") from e
        else:
            if outcome.changed:
                patch = diff(json.loads(json.dumps(pod)), outcome.obj)
                response["patchType"] = "JSONPatch"
                response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def webhook_configuration(
    ca_bundle_pem: bytes | None,
    service: str = "fedgate-agent",
    namespace: str = "fedgate-system",
    port: int = 443,
    timeout_seconds: int = 10,
) -> Json:
    """The MutatingWebhookConfiguration for the injector behind `service`.`namespace`:`port`.

    `ca_bundle_pem`: the cluster CA's published roots (PEM); None leaves `caBundle` out, for an
    installer that fills it in afterwards (the API server cannot call the webhook until then).
    """
    client: Json = {
        "service": {"name": service, "namespace": namespace, "path": WEBHOOK_PATH, "port": port}
    }
    if ca_bundle_pem is not None:
        client["caBundle"] = base64.b64encode(ca_bundle_pem).decode()
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {
            "name": CONFIGURATION_NAME,
            "labels": {"app.kubernetes.io/part-of": "fedgate"},
        },
        "webhooks": [
            {
                "name": WEBHOOK_NAME,
                "clientConfig": client,
                "rules": [
                    {
                        "operations": ["CREATE"],
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                        "scope": "Namespaced",
                    }
                ],
                "namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: "enabled"}},
                "failurePolicy": "Ignore",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": timeout_seconds,
                "reinvocationPolicy": "Never",
            }
        ],
    }


def service_dns_names(service: str, namespace: str) -> tuple[str, ...]:
    """The names the API server may use for the webhook Service (its certificate's DNS SANs)."""
    return (f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local")
