"""Which objects carry a pod to inject, and the rules deciding whether it is injected.

`inject_object` takes one decoded manifest and returns an `Outcome`: the object (a copy,
injected or not) and what happened to each pod in it. Kinds, as `linkerd inject` and
`istioctl kube-inject` read them: Pod; Deployment, StatefulSet, DaemonSet, ReplicaSet,
ReplicationController and Job (`spec.template`); CronJob (`spec.jobTemplate.spec.template`);
`List` (each of its `items`). Any other kind passes through unchanged.

A pod is left as it is when it, or the workload holding its template, is annotated
`fedgate.io/inject: disabled` (the opt-out), or when it already carries `fedgate.io/injected`
(injecting twice is injecting once). A pod fedgate cannot serve is refused with
`InjectRefusedError`, naming the object: `hostNetwork: true` (the capture rules would be
installed in the node's network namespace), or a pod whose containers or volumes already use
fedgate's names.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clusters.inject.spec import (
    INJECT_ANNOTATION,
    INJECTED_ANNOTATION,
    InjectSettings,
    Json,
    inject_pod,
)

_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}

INJECTED = "injected"
OPTED_OUT = "skipped: annotated fedgate.io/inject: disabled"
ALREADY = "unchanged: already injected"
NOT_A_WORKLOAD = "unchanged: no pod template"


class InjectRefusedError(ValueError):
    """A pod that cannot be injected; the message names the object and says why."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """The object after injection and, per object seen, `(kind/namespace/name, what happened)`."""

    obj: Json
    report: tuple[tuple[str, str], ...]

    @property
    def changed(self) -> bool:
        return any(what == INJECTED for _, what in self.report)


def object_ref(obj: Mapping[str, Any], namespace: str) -> str:
    """`Kind namespace/name` (or `generateName`), as the refusal messages name an object."""
    meta = obj.get("metadata") or {}
    name = meta.get("name") or meta.get("generateName") or "<unnamed>"
    return f"{obj.get('kind', '<no kind>')} {meta.get('namespace') or namespace}/{name}"


def _annotation(meta: Mapping[str, Any] | None, key: str) -> str | None:
    value = ((meta or {}).get("annotations") or {}).get(key)
    return None if value is None else str(value)


def inject_object(obj: Mapping[str, Any], namespace: str, s: InjectSettings) -> Outcome:
    """Inject every pod `obj` holds; `namespace` applies where the object names none."""
    out: Json = copy.deepcopy(dict(obj))
    kind = out.get("kind")
    if kind == "List" or (isinstance(kind, str) and kind.endswith("List") and "items" in out):
        report: list[tuple[str, str]] = []
        items = []
        for item in out.get("items") or []:
            outcome = inject_object(item, namespace, s)
            items.append(outcome.obj)
            report += outcome.report
        out["items"] = items
        return Outcome(out, tuple(report))
    ref = object_ref(out, namespace)
    path = _TEMPLATE_PATHS.get(kind) if isinstance(kind, str) else None
    if path is None:
        return Outcome(out, ((ref, NOT_A_WORKLOAD),))
    holder = out
    for key in path:
        holder = holder.get(key) or {}
    pod_meta: Json = holder.get("metadata") or {}
    if "disabled" in (
        _annotation(out.get("metadata"), INJECT_ANNOTATION),
        _annotation(pod_meta, INJECT_ANNOTATION),
    ):
        return Outcome(out, ((ref, OPTED_OUT),))
    if _annotation(pod_meta, INJECTED_ANNOTATION) is not None:
        return Outcome(out, ((ref, ALREADY),))
    spec = holder.get("spec")
    if not isinstance(spec, dict):
        raise InjectRefusedError(f"{ref}: it has no pod spec at {'.'.join((*path, 'spec'))}")
    if spec.get("hostNetwork"):
        raise InjectRefusedError(
            f"{ref}: cannot inject a hostNetwork pod (the capture rules would apply to the "
            f"node's network namespace); annotate it {INJECT_ANNOTATION}: disabled"
        )
    pod_ns = (out.get("metadata") or {}).get("namespace") or namespace
    try:
        holder["metadata"], holder["spec"] = inject_pod(pod_meta, spec, pod_ns, s)
    except ValueError as e:
        raise InjectRefusedError(f"{ref}: cannot inject: {e}") from e
    except (AttributeError, TypeError) as e:  # a field of the wrong type, e.g. containers: "x"
        raise InjectRefusedError(f"{ref}: malformed pod spec: {e}") from e
    return Outcome(out, ((ref, INJECTED),))
