"""TrafficPolicy YAML documents from a directory, validated, as `mesh.model.TrafficPolicy`s.

```yaml
apiVersion: fedgate.io/v1alpha1
kind: TrafficPolicy
metadata: {name: echo, namespace: demo}
spec:
  host: echo.demo.svc.clusterset.local
  clusterWeights:
    - {cluster: local, weight: 80}
    - {cluster: remote, weight: 20}
```

Every `*.yaml` file may hold several documents (`---`); documents of other kinds are left to
their own loaders. Errors name the file, the document and the field, and nothing is returned
unless every document is valid. Spec fields this version does not implement (retries,
timeouts, ...) are refused rather than silently ignored. The full GitOps schema (Federation,
AuthorizationPolicy, commits applied in one transaction) is a later issue.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from federation.errors import PolicyFileError
from mesh.errors import MeshError
from mesh.model import ClusterWeight, TrafficPolicy
from mesh.naming import ServiceKey, check_label

API_VERSION = "fedgate.io/v1alpha1"
KIND = "TrafficPolicy"
SPEC_FIELDS = ("host", "clusterWeights")
WEIGHT_FIELDS = ("cluster", "weight")
SPECIAL_CLUSTERS = ("local", "remote")


class _InvalidFieldError(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _InvalidFieldError(field, f"must be a mapping, got {type(value).__name__}")
    return value


def _string(obj: Mapping[str, Any], name: str, field: str) -> str:
    value = obj.get(name)
    if value is None:
        raise _InvalidFieldError(field, "is required")
    if not isinstance(value, str):
        raise _InvalidFieldError(field, f"must be a string, got {type(value).__name__}")
    return value


def _label(obj: Mapping[str, Any], name: str, field: str) -> str:
    value = _string(obj, name, field)
    try:
        return check_label(value, field)
    except MeshError as e:
        raise _InvalidFieldError(field, str(e)) from e


def _no_unknown(obj: Mapping[str, Any], allowed: tuple[str, ...], field: str) -> None:
    for name in obj:
        if name not in allowed:
            raise _InvalidFieldError(
                f"{field}.{name}", f"is not supported (known: {', '.join(allowed)})"
            )


def _weights(value: Any) -> tuple[ClusterWeight, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _InvalidFieldError(
            "spec.clusterWeights", f"must be a list, got {type(value).__name__}"
        )
    out: list[ClusterWeight] = []
    for i, raw in enumerate(value):
        field = f"spec.clusterWeights[{i}]"
        item = _mapping(raw, field)
        _no_unknown(item, WEIGHT_FIELDS, field)
        cluster = _string(item, "cluster", f"{field}.cluster")
        if cluster not in SPECIAL_CLUSTERS:
            cluster = _label(item, "cluster", f"{field}.cluster")
        weight = item.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise _InvalidFieldError(
                f"{field}.weight", f"must be a non-negative integer, got {weight!r}"
            )
        if any(w.cluster == cluster for w in out):
            raise _InvalidFieldError(f"{field}.cluster", f"{cluster!r} is weighted twice")
        out.append(ClusterWeight(cluster, weight))
    return tuple(out)


def parse_policy(document: Any, where: str = "document") -> TrafficPolicy | None:
    """One YAML document -> a TrafficPolicy, or None for another kind; raises PolicyFileError."""
    try:
        return _parse(document)
    except _InvalidFieldError as e:
        raise PolicyFileError(f"{where}: {e}") from None


def _parse(document: Any) -> TrafficPolicy | None:
    doc = _mapping(document, "document")
    kind = _string(doc, "kind", "kind")
    if kind != KIND:
        return None
    api_version = _string(doc, "apiVersion", "apiVersion")
    if api_version != API_VERSION:
        raise _InvalidFieldError("apiVersion", f"must be {API_VERSION!r}, got {api_version!r}")
    metadata = _mapping(doc.get("metadata"), "metadata")
    _label(metadata, "name", "metadata.name")
    namespace = _label(metadata, "namespace", "metadata.namespace")
    spec = _mapping(doc.get("spec"), "spec")
    _no_unknown(spec, SPEC_FIELDS, "spec")
    host = _string(spec, "host", "spec.host")
    try:
        key = ServiceKey.parse_fqdn(host)
    except MeshError as e:
        raise _InvalidFieldError("spec.host", str(e)) from e
    if key.namespace != namespace:
        raise _InvalidFieldError(
            "spec.host",
            f"{host!r} is not in the policy's namespace {namespace!r} "
            f"(expected <service>.{namespace}.svc.clusterset.local)",
        )
    return TrafficPolicy(key=key, cluster_weights=_weights(spec.get("clusterWeights")))


def load_policy_file(path: Path) -> list[tuple[str, TrafficPolicy]]:
    """(where, policy) for every TrafficPolicy document in `path`; raises PolicyFileError."""
    try:
        documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except OSError as e:
        raise PolicyFileError(f"{path}: cannot read: {e}") from e
    except yaml.YAMLError as e:
        raise PolicyFileError(f"{path}: not valid YAML: {e}") from e
    out: list[tuple[str, TrafficPolicy]] = []
    for index, document in enumerate(documents, start=1):
        if document is None:  # an empty document, e.g. after a trailing `---`
            continue
        where = f"{path} (document {index})"
        policy = parse_policy(document, where)
        if policy is not None:
            out.append((where, policy))
    return out


def load_policies(directory: Path) -> tuple[TrafficPolicy, ...]:
    """Every TrafficPolicy in `directory/*.yaml`, sorted by service; one per service."""
    if not directory.is_dir():
        raise PolicyFileError(f"{directory}: not a directory")
    seen: dict[ServiceKey, str] = {}
    policies: list[TrafficPolicy] = []
    for path in sorted(directory.glob("*.yaml")):
        for where, policy in load_policy_file(path):
            if policy.key in seen:
                raise PolicyFileError(
                    f"{where}: spec.host: {policy.key.fqdn} already has a policy in "
                    f"{seen[policy.key]}"
                )
            seen[policy.key] = where
            policies.append(policy)
    return tuple(sorted(policies, key=lambda p: p.key))
