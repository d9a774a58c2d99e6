"""Defaulting and validation of the built-in kinds the fake serves beyond Services and Pods:
Namespaces and MutatingWebhookConfigurations, as kube-apiserver does them.

Namespaces: the `kubernetes.io/metadata.name` label (set on every namespace since 1.21, so a
selector can name one), `spec.finalizers: [kubernetes]`, `status.phase: Active`.
MutatingWebhookConfigurations (pkg/apis/admissionregistration/v1/defaults.go): per webhook
`failurePolicy: Fail`, `matchPolicy: Equivalent`, `namespaceSelector`/`objectSelector` `{}`,
`reinvocationPolicy: Never`, `timeoutSeconds: 10`, service port 443, rule `scope: "*"`; and the
validation that matters to a partial write (an apply that would create one from a caBundle
alone): each webhook needs exactly one of `clientConfig.url`/`service`, `sideEffects` and
`admissionReviewVersions`, answered 422 `Invalid` like the real server.
"""

from __future__ import annotations

from tests.kubefake.resources import Obj, Resource, status

# Built-in kinds whose metadata.generation the server keeps (besides custom resources).
GENERATION = frozenset({"endpointslices", "mutatingwebhookconfigurations"})


def defaults(res: Resource, obj: Obj) -> None:
    if res.plural == "namespaces":
        meta = obj.setdefault("metadata", {})
        labels = meta.get("labels") or {}
        meta["labels"] = {**labels, "kubernetes.io/metadata.name": meta.get("name", "")}
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj.setdefault("status", {}).setdefault("phase", "Active")
    elif res.plural == "mutatingwebhookconfigurations":
        for hook in obj.get("webhooks") or []:
            for key, value in (
                ("failurePolicy", "Fail"),
                ("matchPolicy", "Equivalent"),
                ("namespaceSelector", {}),
                ("objectSelector", {}),
                ("reinvocationPolicy", "Never"),
                ("timeoutSeconds", 10),
            ):
                hook.setdefault(key, value)
            service = (hook.get("clientConfig") or {}).get("service")
            if isinstance(service, dict):
                service.setdefault("port", 443)
            for rule in hook.get("rules") or []:
                rule.setdefault("scope", "*")


def validate(res: Resource, obj: Obj) -> None:
    """Raise StoreError(422) for an object the real server's validation refuses."""
    from tests.kubefake.store import StoreError  # store imports this module

    if res.plural != "mutatingwebhookconfigurations":
        return
    causes: list[tuple[str, str]] = []
    for i, hook in enumerate(obj.get("webhooks") or []):
        at = f"webhooks[{i}]"
        client = hook.get("clientConfig") or {}
        if ("url" in client) == ("service" in client):
            causes.append((f"{at}.clientConfig", "exactly one of url or service is required"))
        if not hook.get("sideEffects"):
            causes.append(
                (f"{at}.sideEffects", "must specify one of None, NoneOnDryRun, Some, Unknown")
            )
        if not hook.get("admissionReviewVersions"):
            causes.append((f"{at}.admissionReviewVersions", "must specify one of v1, v1beta1"))
    if not causes:
        return
    name = obj.get("metadata", {}).get("name", "")
    qualified = f"{res.kind}.{res.group}"
    text = ", ".join(f"{field}: Required value: {why}" for field, why in causes)
    details = {
        "name": name,
        "group": res.group,
        "kind": res.kind,
        "causes": [
            {"reason": "FieldValueRequired", "message": f"Required value: {why}", "field": f}
            for f, why in causes
        ],
    }
    raise StoreError(status(422, "Invalid", f'{qualified} "{name}" is invalid: [{text}]', details))
