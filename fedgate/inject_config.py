"""The injector's settings, read once at the edge: a YAML file and command-line overrides.

`fedgate inject --config FILE` and the agent's `--inject-config FILE` read the same file, a
mapping of `clusters.inject.spec.InjectSettings` fields in camelCase, as the agent's ConfigMap
holds it (the way Istio's injector reads its `istio-sidecar-injector` ConfigMap):

    cluster: east
    controllerAddress: controller.fedgate.example:15012
    caAddress: fedgate-ca.fedgate-system.svc:15013
    image: ghcr.io/example/fedgate:0.1.0
    clusterDNS: 10.96.0.10

The capture ports and the sidecar's GID default to the ones the rig's sidecars use
(`sidecar.settings.SidecarSettings`, `sidecar.capture.CaptureConfig`), so both capture alike.
"""

from __future__ import annotations

import dataclasses
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from clusters.inject.spec import InjectSettings
from sidecar.capture import CaptureConfig

_FIELDS = {f.name: f for f in dataclasses.fields(InjectSettings)}
_CAMEL = {re.sub(r"_(\w)", lambda m: m.group(1).upper(), n): n for n in _FIELDS}
_CAMEL["clusterDNS"] = "cluster_dns"


def version() -> str:
    try:
        return metadata.version("fedgate")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0.0.0"


def load(path: Path | None, **overrides: Any) -> InjectSettings:
    """Settings from `path` (if any), then `overrides` (snake_case; None means not given).
    ValueError names the bad key or value."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read {path}: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of injector settings")
        for key, value in data.items():
            name = _CAMEL.get(str(key))
            if name is None:
                raise ValueError(f"{path}: unknown key {key!r} (known: {sorted(_CAMEL)})")
            values[name] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    capture = CaptureConfig()
    values.setdefault("outbound_port", capture.outbound_port)
    values.setdefault("inbound_port", capture.inbound_port)
    values.setdefault("proxy_gid", capture.proxy_gid)
    values.setdefault("version", version())
    values.setdefault("image", f"fedgate:{values['version']}")
    missing = sorted(n for n in ("cluster", "controller_address") if not values.get(n))
    if missing:
        raise ValueError(f"injector settings: {', '.join(missing)} not given")
    for name, value in values.items():
        expected = int if _FIELDS[name].type == "int" else str
        if not isinstance(value, expected) or isinstance(value, bool):
            raise ValueError(
                f"injector setting {name}: expected {expected.__name__}, got {value!r}"
            )
    try:
        return InjectSettings(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"injector settings: {e}") from e
