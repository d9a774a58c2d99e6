"""The federation's desired config as the controller reads it from etcd, pure.

Everything under /fedgate/config/ is one config: the GitOps sync (federation.gitops) writes it
in ONE transaction together with /fedgate/config/commit, so a controller that reads the prefix
at one revision never sees half a commit. Until GitOps runs, the leader seeds the policies from
its config directory (and only while no commit key exists).

`config_from_entries` turns the raw keys into a `FederationConfig`:

- `/fedgate/config/commit`              -> `commit`: the `sha` of its JSON record (or the
                                           value's text, if it is not JSON)
- `/fedgate/config/policies/<ns>/<svc>` -> `policies` (TrafficPolicy JSON, mesh.codec)
- `/fedgate/config/denied/<rest>`       -> `denied[<rest>]` (value text; the identity issue
                                           defines what an entry means)
- any other key                         -> `documents[<key>]` (raw bytes), for the config kinds
                                           other modules add (AuthorizationPolicy, ...)

A malformed policy is skipped and reported in `problems` (the driver logs it); it never stops
the rest of the config. `generate()` takes a `FederationConfig`, so new config kinds extend
this object instead of generate's signature.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from federation import keys
from mesh.codec import decode, policy_from_json
from mesh.errors import MeshError
from mesh.model import TrafficPolicy


@dataclass(frozen=True, slots=True)
class FederationConfig:
    """The config `generate()` applies; equal configs generate equal snapshots."""

    commit: str = ""
    policies: tuple[TrafficPolicy, ...] = ()
    denied: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    documents: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))


EMPTY_CONFIG = FederationConfig()


def commit_sha(raw: bytes) -> str:
    """The commit SHA the GitOps sync recorded (`{"sha": ...}`), or the raw text."""
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if isinstance(record, dict) and isinstance(record.get("sha"), str):
        return str(record["sha"])
    return raw.decode("utf-8", "replace").strip()


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    key: str
    error: str


def config_from_entries(
    entries: Mapping[str, bytes],
) -> tuple[FederationConfig, tuple[ConfigProblem, ...]]:
    """Decode every key under /fedgate/config/ (key -> value, as read at one revision)."""
    commit = ""
    policies: dict[object, TrafficPolicy] = {}
    denied: dict[str, str] = {}
    documents: dict[str, bytes] = {}
    problems: list[ConfigProblem] = []
    for key in sorted(entries):
        value = entries[key]
        if key == keys.COMMIT_KEY:
            commit = commit_sha(value)
        elif key.startswith(keys.POLICIES_PREFIX):
            try:
                service = keys.parse_service_key(keys.POLICIES_PREFIX, key)
                policy: TrafficPolicy = decode(value, policy_from_json, key)
                if policy.key != service:
                    raise ValueError(f"value is the policy of {policy.key}")
            except (ValueError, MeshError) as e:
                problems.append(ConfigProblem(key, str(e)))
                continue
            policies[service] = policy
        elif key.startswith(keys.DENIED_PREFIX):
            denied[key[len(keys.DENIED_PREFIX) :]] = value.decode("utf-8", "replace")
        elif key.startswith(keys.CONFIG_PREFIX):
            documents[key] = bytes(value)
    config = FederationConfig(
        commit=commit,
        policies=tuple(policies[k] for k in sorted(policies, key=str)),
        denied=MappingProxyType(denied),
        documents=MappingProxyType(documents),
    )
    return config, tuple(problems)
