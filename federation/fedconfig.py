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
- `/fedgate/config/authorization/<ns>/<name>` -> `authorization` (AuthorizationPolicy JSON)
- `/fedgate/config/federation`          -> `localities` (each cluster's declared network,
                                           region and zone), and kept in `documents` too
- any other key                         -> `documents[<key>]` (raw bytes), for the config kinds
                                           other modules add (AuthorizationPolicy, ...)

A malformed policy (traffic or authorization) is skipped and reported in `problems` (the driver
logs it); it never stops the rest of the config. `generate()` takes a `FederationConfig`, so
new config kinds extend this object instead of generate's signature.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from federation import keys
from mesh.codec import authorization_from_json, decode, policy_from_json
from mesh.errors import MeshError
from mesh.model import AuthorizationPolicy, TrafficPolicy


@dataclass(frozen=True, slots=True)
class Locality:
    """Where the Federation document says a cluster is ("" = not declared)."""

    network: str = ""
    region: str = ""
    zone: str = ""


@dataclass(frozen=True, slots=True)
class FederationConfig:
    """The config `generate()` applies; equal configs generate equal snapshots."""

    commit: str = ""
    policies: tuple[TrafficPolicy, ...] = ()
    authorization: tuple[AuthorizationPolicy, ...] = ()  # sorted by (namespace, name)
    denied: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    documents: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))
    localities: Mapping[str, Locality] = field(default_factory=lambda: MappingProxyType({}))


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


def localities_from_federation(raw: bytes) -> dict[str, Locality]:
    """Each cluster's declared locality from the normalised Federation JSON (as the GitOps sync
    stores it: `spec.clusters[].{name, network, locality.{region, zone}}`); ValueError names
    what is malformed."""
    try:
        clusters = json.loads(raw)["spec"]["clusters"]
        out: dict[str, Locality] = {}
        for c in clusters:
            loc = c.get("locality") or {}
            fields = (
                c["name"],
                c.get("network") or "",
                loc.get("region") or "",
                loc.get("zone") or "",
            )
            if not all(isinstance(f, str) for f in fields):
                raise TypeError(f"cluster {fields[0]!r}: name, network, region, zone are strings")
            found = Locality(*fields[1:])
            if found != Locality():
                out[fields[0]] = found
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"Federation document is malformed: {type(e).__name__}: {e}") from e
    return out


def config_from_entries(
    entries: Mapping[str, bytes],
) -> tuple[FederationConfig, tuple[ConfigProblem, ...]]:
    """Decode every key under /fedgate/config/ (key -> value, as read at one revision)."""
    commit = ""
    policies: dict[object, TrafficPolicy] = {}
    authorization: list[AuthorizationPolicy] = []
    denied: dict[str, str] = {}
    documents: dict[str, bytes] = {}
    localities: dict[str, Locality] = {}
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
        elif key.startswith(keys.AUTHORIZATION_PREFIX):
            try:
                authz: AuthorizationPolicy = decode(value, authorization_from_json, key)
                if keys.authorization_key(authz.key.namespace, authz.name) != key:
                    raise ValueError(f"value is policy {authz.ref}")
            except (ValueError, MeshError) as e:
                problems.append(ConfigProblem(key, str(e)))
                continue
            authorization.append(authz)  # keys are sorted: so is this
        elif key.startswith(keys.DENIED_PREFIX):
            denied[key[len(keys.DENIED_PREFIX) :]] = value.decode("utf-8", "replace")
        elif key.startswith(keys.CONFIG_PREFIX):
            documents[key] = bytes(value)
            if key == keys.FEDERATION_KEY:
                try:
                    localities = localities_from_federation(value)
                except ValueError as e:
                    problems.append(ConfigProblem(key, str(e)))
    config = FederationConfig(
        commit=commit,
        policies=tuple(policies[k] for k in sorted(policies, key=str)),
        authorization=tuple(authorization),
        denied=MappingProxyType(denied),
        documents=MappingProxyType(documents),
        localities=MappingProxyType(localities),
    )
    return config, tuple(problems)
