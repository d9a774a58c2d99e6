"""Snapshot payloads on the config stream: full, or a delta against a version the proxy has.

A full payload is `mesh.codec.dumps(snapshot_to_json(snapshot))`. A delta (xDS's incremental
variant, for one resource type) is

```json
{"base": "<version the proxy runs>", "remove": [["<ns>", "<svc>"], ...],
 "snapshot": <the new snapshot with "services": []>, "upsert": [<service JSON>, ...]}
```

so everything but the services (clusters, trust bundle, policies and whatever other modules add
to the snapshot) always travels whole and only the changed services travel at all. The proxy
applies it to its last good snapshot (`apply_delta`) and gets exactly the snapshot the
controller built; if its version is not `base` it asks for a full resync instead.

`FragmentCache` keeps each service's encoded JSON (and a digest of it) while the controller
reuses the same `MergedService` object, so an endpoint change costs one service's encoding, not
100,000 endpoints'. Pure: no I/O. The version itself is computed in federation.generate.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from mesh.codec import (
    dumps,
    loads,
    service_from_json,
    service_to_json,
    snapshot_from_json,
    snapshot_to_json,
)
from mesh.errors import CodecError, MeshError
from mesh.model import MergedService, Snapshot
from mesh.naming import ServiceKey


def _guard(what: str, fn: Any, obj: Any) -> Any:
    try:
        return fn(obj)
    except (MeshError, ValueError, TypeError, AttributeError, KeyError) as e:
        raise CodecError(f"{what}: {e}") from e


class DeltaBaseError(CodecError):
    """The delta is against another version than the one the proxy runs: resync."""


def _order(s: MergedService) -> tuple[str, str]:
    return (s.key.namespace, s.key.name)


def sort_services(services: Iterable[MergedService]) -> tuple[MergedService, ...]:
    return tuple(sorted(services, key=_order))


class FragmentCache:
    """Each service's JSON (and its SHA-256), recomputed only when the service changed."""

    def __init__(self) -> None:
        self._by_key: dict[ServiceKey, tuple[MergedService, bytes, bytes]] = {}
        self.encoded = 0  # metric: services encoded (cache misses)

    def entry(self, s: MergedService) -> tuple[bytes, bytes]:
        """(fragment, digest) of `s`."""
        hit = self._by_key.get(s.key)
        if hit is not None and (hit[0] is s or hit[0] == s):
            return hit[1], hit[2]
        fragment = dumps(service_to_json(s))
        digest = hashlib.sha256(fragment).digest()
        self._by_key[s.key] = (s, fragment, digest)
        self.encoded += 1
        return fragment, digest

    def __len__(self) -> int:
        return len(self._by_key)

    def fragment(self, s: MergedService) -> bytes:
        return self.entry(s)[0]

    def digest(self, s: MergedService) -> bytes:
        return self.entry(s)[1]

    def retain(self, keys: Iterable[ServiceKey]) -> None:
        """Forget services not in `keys` (they were deleted)."""
        wanted = set(keys)
        for key in [k for k in self._by_key if k not in wanted]:
            del self._by_key[key]


def skeleton_json(snapshot: Snapshot) -> bytes:
    """The snapshot's JSON without services (also what the version hashes besides services)."""
    return dumps(snapshot_to_json(replace(snapshot, services=())))


def encode_full(snapshot: Snapshot, cache: FragmentCache | None = None) -> bytes:
    """Byte-identical to `dumps(snapshot_to_json(snapshot))`, from cached fragments."""
    cache = FragmentCache() if cache is None else cache
    top = snapshot_to_json(replace(snapshot, services=()))
    parts = []
    for name in sorted(top):
        if name == "services":
            value = b"[" + b",".join(cache.fragment(s) for s in snapshot.services) + b"]"
        else:
            value = json.dumps(top[name], sort_keys=True, separators=(",", ":")).encode()
        parts.append(json.dumps(name).encode() + b":" + value)
    return b"{" + b",".join(parts) + b"}"


def encode_delta(base: Snapshot, snapshot: Snapshot, cache: FragmentCache | None = None) -> bytes:
    """The delta turning `base` into `snapshot`."""
    cache = FragmentCache() if cache is None else cache
    old = {s.key: s for s in base.services}
    new_keys = set()
    upserts = []
    for s in snapshot.services:
        new_keys.add(s.key)
        previous = old.get(s.key)
        if previous is None or (previous is not s and previous != s):
            upserts.append(cache.fragment(s))
    removed = sorted([k.namespace, k.name] for k in old if k not in new_keys)
    return (
        b'{"base":'
        + json.dumps(base.version).encode()
        + b',"remove":'
        + json.dumps(removed, separators=(",", ":")).encode()
        + b',"snapshot":'
        + skeleton_json(snapshot)
        + b',"upsert":['
        + b",".join(upserts)
        + b"]}"
    )


def apply_delta(base: Snapshot, payload: bytes) -> Snapshot:
    """The snapshot a delta describes; `DeltaBaseError` if it is not against `base`."""
    obj = loads(payload, "delta")
    if obj.get("base") != base.version:
        raise DeltaBaseError(f"delta against {obj.get('base')!r}, running {base.version!r}")
    skeleton: Snapshot = _guard("delta snapshot", snapshot_from_json, obj.get("snapshot"))
    removed, upserts = obj.get("remove"), obj.get("upsert")
    if not isinstance(removed, list) or not isinstance(upserts, list):
        raise CodecError("delta needs lists 'remove' and 'upsert'")
    services = {s.key: s for s in base.services}
    for item in removed:
        if not (
            isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)
        ):
            raise CodecError(f"delta 'remove' entry {item!r} is not [namespace, name]")
        services.pop(ServiceKey(item[0], item[1]), None)
    for raw in upserts:
        s: MergedService = _guard("delta service", service_from_json, raw)
        services[s.key] = s
    return replace(skeleton, services=sort_services(services.values()))
