"""The "file" cluster adapter: a cluster's ServiceExports and endpoints kept in a JSON file.

The rig (and anyone without Kubernetes) describes each cluster in `<rigdir>/clusters/<name>/`:

    exports.json  [{"namespace", "name", "ports": [{"name", "port", "protocol"}],
                    "created": <epoch seconds>,
                    "endpoints": [{"pod", "address", "serviceAccount",
                                   optional "labels": {"version": "v2", ...}}]}, ...]
    tokens.json   {"<join token>": {"namespace", "serviceAccount"}, ...}

Parsing is strict (unknown keys, duplicates and bad values are errors naming the field), because
a typo silently dropping an endpoint is worse than a refusal. Updates (`add_export`, ...) are
locked read-modify-writes replaced atomically, so the agent polling the file never reads half of
one. `FileClusterSource` implements `mesh.interfaces.ClusterSource` by polling.

This module does not publish anything (the agent does) and issues no certificate (tokens are only
stored here; the agent's CA service checks them through `FileTokenAuthenticator`).

Over the 450-line aim: the format, its updates and its reader change together; if it grows, the
parsing half (everything above "file updates") is the part to move out.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ca.files import atomic_write, locked
from ca.tokens import AuthenticatorUnavailableError, ServiceAccount, TokenRefusedError
from mesh.errors import InvalidNameError
from mesh.model import Endpoint, ServiceExport, ServicePort
from mesh.naming import ServiceKey, SpiffeId, check_label

_log = logging.getLogger("fedgate.clusters.source")

EXPORTS_FILE = "exports.json"
TOKENS_FILE = "tokens.json"
DEFAULT_POLL_INTERVAL = 1.0


class SourceError(Exception):
    """An exports or tokens file is malformed; the message names the file and the field."""


def cluster_dir(rigdir: Path, cluster: str) -> Path:
    return rigdir / "clusters" / check_label(cluster, "cluster name")


def exports_path(rigdir: Path, cluster: str) -> Path:
    return cluster_dir(rigdir, cluster) / EXPORTS_FILE


def tokens_path(rigdir: Path, cluster: str) -> Path:
    return cluster_dir(rigdir, cluster) / TOKENS_FILE


@dataclass(frozen=True, slots=True)
class EndpointEntry:
    pod: str
    address: str
    service_account: str
    labels: tuple[tuple[str, str], ...] = ()  # sorted; subsets select on them


@dataclass(frozen=True, slots=True)
class ExportEntry:
    """One entry of exports.json, before it is bound to a cluster and a trust domain."""

    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    created: float
    endpoints: tuple[EndpointEntry, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """The identity a join token lets a workload obtain an SVID for."""

    namespace: str
    service_account: str


# --- parsing ------------------------------------------------------------------------------


def _obj(value: object, where: str, required: set[str], optional: set[str]) -> dict[str, object]:
    if not isinstance(value, dict):
        raise SourceError(f"{where}: expected an object, got {type(value).__name__}")
    missing = sorted(required - value.keys())
    if missing:
        raise SourceError(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(value.keys() - required - optional)
    if unknown:
        raise SourceError(f"{where}: unknown field {', '.join(map(repr, unknown))}")
    return value


def _list(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise SourceError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _str(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise SourceError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _label(value: object, where: str, what: str) -> str:
    try:
        return check_label(_str(value, where), what)
    except InvalidNameError as e:
        raise SourceError(f"{where}: {e}") from e


def _port(value: object, where: str) -> ServicePort:
    d = _obj(value, where, {"name", "port"}, {"protocol"})
    number = d["port"]
    if not isinstance(number, int) or isinstance(number, bool):
        raise SourceError(f"{where}.port: expected an integer, got {number!r}")
    try:
        return ServicePort(
            name=_str(d["name"], f"{where}.name"),
            port=number,
            protocol=_str(d.get("protocol", "TCP"), f"{where}.protocol"),
        )
    except ValueError as e:
        raise SourceError(f"{where}: {e}") from e


def _endpoint(value: object, where: str) -> EndpointEntry:
    d = _obj(value, where, {"pod", "address", "serviceAccount"}, {"labels"})
    address = _str(d["address"], f"{where}.address")
    try:
        ipaddress.ip_address(address)
    except ValueError as e:
        raise SourceError(f"{where}.address: {address!r} is not an IP address") from e
    return EndpointEntry(
        pod=_str(d["pod"], f"{where}.pod"),
        address=address,
        service_account=_label(d["serviceAccount"], f"{where}.serviceAccount", "service account"),
        labels=_labels(d.get("labels", {}), f"{where}.labels"),
    )


def _labels(value: object, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise SourceError(f"{where}: expected an object, got {type(value).__name__}")
    return tuple(sorted((_str(k, where), _str(v, f"{where}.{k}")) for k, v in value.items()))


def _export(value: object, where: str) -> ExportEntry:
    d = _obj(value, where, {"namespace", "name", "ports", "created"}, {"endpoints"})
    created = d["created"]
    if (
        not isinstance(created, int | float)
        or isinstance(created, bool)
        or not math.isfinite(created)
        or created < 0
    ):
        raise SourceError(f"{where}.created: expected epoch seconds (>= 0), got {created!r}")
    ports = tuple(
        _port(p, f"{where}.ports[{i}]") for i, p in enumerate(_list(d["ports"], f"{where}.ports"))
    )
    names = [p.name for p in ports]
    for name in names:
        if names.count(name) > 1:
            raise SourceError(f"{where}.ports: port name {name!r} appears twice")
    raw_endpoints = _list(d.get("endpoints", []), f"{where}.endpoints")
    endpoints = tuple(_endpoint(e, f"{where}.endpoints[{i}]") for i, e in enumerate(raw_endpoints))
    pods = [e.pod for e in endpoints]
    for pod in pods:
        if pods.count(pod) > 1:
            raise SourceError(f"{where}.endpoints: pod {pod!r} appears twice")
    return ExportEntry(
        namespace=_label(d["namespace"], f"{where}.namespace", "namespace"),
        name=_label(d["name"], f"{where}.name", "service name"),
        ports=ports,
        created=float(created),
        endpoints=endpoints,
    )


def _json(text: str | bytes, where: str) -> object:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{where}: not valid JSON: {e}") from e


def parse_exports(text: str | bytes, *, where: str = EXPORTS_FILE) -> tuple[ExportEntry, ...]:
    """Parse and validate the content of an exports.json; `where` prefixes every error."""
    items = _list(_json(text, where), where)
    entries = tuple(_export(item, f"{where}[{i}]") for i, item in enumerate(items))
    seen: set[tuple[str, str]] = set()
    for i, e in enumerate(entries):
        if (e.namespace, e.name) in seen:
            raise SourceError(f"{where}[{i}]: export {e.name}.{e.namespace} appears twice")
        seen.add((e.namespace, e.name))
    return entries


def exports_to_json(entries: Sequence[ExportEntry]) -> str:
    data = [
        {
            "namespace": e.namespace,
            "name": e.name,
            "ports": [{"name": p.name, "port": p.port, "protocol": p.protocol} for p in e.ports],
            "created": e.created,
            "endpoints": [
                {
                    "pod": ep.pod,
                    "address": ep.address,
                    "serviceAccount": ep.service_account,
                    **({"labels": dict(ep.labels)} if ep.labels else {}),
                }
                for ep in e.endpoints
            ],
        }
        for e in entries
    ]
    return json.dumps(data, indent=2) + "\n"


def to_service_exports(
    entries: Sequence[ExportEntry], cluster: str, trust_domain: str
) -> tuple[ServiceExport, ...]:
    """Bind entries to their cluster; endpoint identities are SPIFFE IDs in `trust_domain`.

    Output is sorted (exports by key, endpoints by address), so equal files give equal values
    whatever order their lines are in.
    """
    exports = []
    for e in entries:
        endpoints = sorted(
            Endpoint(
                cluster=cluster,
                address=ep.address,
                pod=ep.pod,
                identity=SpiffeId(trust_domain, e.namespace, ep.service_account),
                labels=ep.labels,
            )
            for ep in e.endpoints
        )
        exports.append(
            ServiceExport(
                cluster=cluster,
                key=ServiceKey(e.namespace, e.name),
                ports=e.ports,
                created=e.created,
                endpoints=tuple(endpoints),
            )
        )
    return tuple(sorted(exports, key=lambda x: x.key))


def parse_tokens(text: str | bytes, *, where: str = TOKENS_FILE) -> dict[str, TokenGrant]:
    data = _json(text, where)
    if not isinstance(data, dict):
        raise SourceError(f"{where}: expected an object, got {type(data).__name__}")
    grants = {}
    for token, value in data.items():
        at = f"{where}[{token[:8]!r}...]"  # never print a whole secret into a log
        _str(token, f"{where}: token")
        d = _obj(value, at, {"namespace", "serviceAccount"}, set())
        grants[token] = TokenGrant(
            namespace=_label(d["namespace"], f"{at}.namespace", "namespace"),
            service_account=_label(d["serviceAccount"], f"{at}.serviceAccount", "service account"),
        )
    return grants


def tokens_to_json(grants: Mapping[str, TokenGrant]) -> str:
    data = {
        t: {"namespace": g.namespace, "serviceAccount": g.service_account}
        for t, g in sorted(grants.items())
    }
    return json.dumps(data, indent=2) + "\n"


# --- file updates -------------------------------------------------------------------------


def read_exports(path: Path) -> tuple[ExportEntry, ...]:
    """The entries of `path`; a missing file is an empty cluster."""
    try:
        return parse_exports(path.read_bytes(), where=str(path))
    except FileNotFoundError:
        return ()


def write_exports(path: Path, entries: Sequence[ExportEntry]) -> None:
    atomic_write(path, exports_to_json(entries))


def _update_exports(path: Path, change: Callable[[list[ExportEntry]], list[ExportEntry]]) -> None:
    with locked(path):
        entries = list(read_exports(path))
        new = change(entries)
        # Re-validate what we are about to write, so the file is never made unreadable.
        parse_exports(exports_to_json(new), where=str(path))
        write_exports(path, new)


def _find(entries: list[ExportEntry], namespace: str, name: str) -> int | None:
    return next(
        (i for i, e in enumerate(entries) if (e.namespace, e.name) == (namespace, name)), None
    )


def add_export(
    path: Path,
    namespace: str,
    name: str,
    ports: Sequence[ServicePort],
    created: float | None = None,
) -> None:
    """Add an export, or replace the ports of an existing one (keeping its creation time and
    endpoints: MCS conflict resolution depends on the creation time staying put)."""
    stamp = time.time() if created is None else created

    def change(entries: list[ExportEntry]) -> list[ExportEntry]:
        i = _find(entries, namespace, name)
        if i is None:
            return [*entries, ExportEntry(namespace, name, tuple(ports), stamp)]
        entries[i] = replace(entries[i], ports=tuple(ports))
        return entries

    _update_exports(path, change)


def remove_export(path: Path, namespace: str, name: str) -> bool:
    """Remove an export; True if it was there."""
    found = False

    def change(entries: list[ExportEntry]) -> list[ExportEntry]:
        nonlocal found
        i = _find(entries, namespace, name)
        found = i is not None
        return [e for j, e in enumerate(entries) if j != i]

    _update_exports(path, change)
    return found


def add_endpoint(
    path: Path,
    namespace: str,
    name: str,
    pod: str,
    address: str,
    service_account: str,
    labels: Mapping[str, str] | None = None,
) -> None:
    """Add (or replace, by pod name) an endpoint of an existing export."""

    def change(entries: list[ExportEntry]) -> list[ExportEntry]:
        i = _find(entries, namespace, name)
        if i is None:
            raise SourceError(f"{path}: no export {name}.{namespace} to add pod {pod!r} to")
        endpoint = EndpointEntry(
            pod, address, service_account, tuple(sorted((labels or {}).items()))
        )
        kept = tuple(ep for ep in entries[i].endpoints if ep.pod != pod)
        entries[i] = replace(entries[i], endpoints=(*kept, endpoint))
        return entries

    _update_exports(path, change)


def remove_pod(path: Path, pod: str) -> int:
    """Remove the pod's endpoints from every export; return how many were removed."""
    removed = 0

    def change(entries: list[ExportEntry]) -> list[ExportEntry]:
        nonlocal removed
        out = []
        for e in entries:
            kept = tuple(ep for ep in e.endpoints if ep.pod != pod)
            removed += len(e.endpoints) - len(kept)
            out.append(replace(e, endpoints=kept))
        return out

    _update_exports(path, change)
    return removed


def read_tokens(path: Path) -> dict[str, TokenGrant]:
    """The grants in `path`; a missing file grants nothing."""
    try:
        return parse_tokens(path.read_bytes(), where=str(path))
    except FileNotFoundError:
        return {}


class FileTokenAuthenticator:
    """`ca.tokens.TokenAuthenticator` over tokens.json, the rig's equivalent of Kubernetes'
    TokenReview: a known token proves its grant's account. The file is re-read on every
    request (the rig adds pods while the agent runs)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def authenticate(self, token: str) -> ServiceAccount:
        try:
            grant = read_tokens(self.path).get(token)
        except (SourceError, OSError) as e:
            raise AuthenticatorUnavailableError(str(e)) from e
        if grant is None:
            raise TokenRefusedError(f"unknown join token (not in {self.path.name})")
        return ServiceAccount(grant.namespace, grant.service_account)


def write_tokens(path: Path, grants: Mapping[str, TokenGrant]) -> None:
    """Replace the tokens file; it holds secrets, so it is kept 0600."""
    atomic_write(path, tokens_to_json(grants), mode=0o600)


def add_token(path: Path, token: str, namespace: str, service_account: str) -> None:
    """Grant `token` the identity (namespace, service account); the file is kept 0600."""
    grant = TokenGrant(
        namespace=_label(namespace, "namespace", "namespace"),
        service_account=_label(service_account, "serviceAccount", "service account"),
    )
    _str(token, "token")
    with locked(path):
        grants = read_tokens(path)
        grants[token] = grant
        write_tokens(path, grants)


# --- the ClusterSource --------------------------------------------------------------------


class FileClusterSource:
    """`mesh.interfaces.ClusterSource` over an exports.json, by polling.

    `changes()` yields the current exports at once, then again whenever they change. The file
    is read every `poll_interval` and re-parsed when (mtime, size, content hash) changes: mtime
    alone misses two writes within one timestamp tick. A malformed file is logged once and the
    previous value kept, so a bad edit never withdraws a cluster's services.
    """

    def __init__(
        self,
        path: Path,
        cluster: str,
        trust_domain: str,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        # Fail here, not on every poll, if the identity parts are malformed.
        SpiffeId(trust_domain, "default", "default")
        self._path = path
        self._cluster = check_label(cluster, "cluster name")
        self._trust_domain = trust_domain
        self._poll_interval = poll_interval
        self._sleep = sleep  # tests pass a fake to step polls without real time

    def _read(self) -> tuple[tuple[int, int, str] | None, bytes]:
        try:
            with open(self._path, "rb") as f:
                st = os.fstat(f.fileno())  # fstat of the file we read, not a later replacement
                data = f.read()
        except FileNotFoundError:
            return None, b""
        return (st.st_mtime_ns, st.st_size, hashlib.sha256(data).hexdigest()), data

    def _parse(
        self, signature: tuple[int, int, str] | None, data: bytes
    ) -> tuple[ServiceExport, ...]:
        if signature is None:
            return ()
        entries = parse_exports(data, where=str(self._path))
        return to_service_exports(entries, self._cluster, self._trust_domain)

    async def changes(self) -> AsyncGenerator[tuple[ServiceExport, ...], None]:
        current: tuple[ServiceExport, ...] | None = None
        last_signature: object = object()  # matches nothing, so the first read is parsed
        while True:
            signature, data = await asyncio.to_thread(self._read)
            if signature != last_signature:
                last_signature = signature
                try:
                    value = self._parse(signature, data)
                except SourceError as e:
                    _log.error(
                        "cluster %s: ignoring malformed %s: %s", self._cluster, self._path, e
                    )
                    value = () if current is None else current
                if value != current:
                    current = value
                    yield value
            await self._sleep(self._poll_interval)
