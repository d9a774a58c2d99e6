"""The federation's deny list as stored under `/fedgate/config/denied/`, pure.

One key per entry, readable with `etcdctl get --prefix /fedgate/config/denied/`:

```
/fedgate/config/denied/id/<trust-domain>/<ns>/<sa>   deny one identity
/fedgate/config/denied/domain/<trust-domain>         deny a whole trust domain (a cluster)
```

The value is JSON: `{"entry": "spiffe://...", "reason": "...", "created": "<ISO 8601>",
"cluster": "<name, when denied by cluster>"}`. A bare `spiffe://...` value is accepted too (an
operator using etcdctl). The controller reads the prefix with the rest of /fedgate/config/
(`federation.fedconfig`), `entries_from_config` turns it into the snapshot's `denied` tuple,
and every verifier refuses a match (`ca.verify`, via `TrustBundle.denied`).

Nothing here touches etcd (fedgate/cli_ca.py writes, the controller reads).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass

from ca.bundle import SPIFFE, normalize_denial
from mesh.naming import SpiffeId

DENIED_PREFIX = "/fedgate/config/denied/"


@dataclass(frozen=True, slots=True)
class Denial:
    entry: str  # canonical: `spiffe://<td>` or `spiffe://<td>/ns/<ns>/sa/<sa>`
    reason: str = ""
    created: str = ""
    cluster: str = ""

    @property
    def is_domain(self) -> bool:
        return "/" not in self.entry[len(SPIFFE) :]


def key_suffix(entry: str) -> str:
    """The key under DENIED_PREFIX for `entry` (canonicalised; ValueError if malformed)."""
    canonical = normalize_denial(entry)
    rest = canonical[len(SPIFFE) :]
    if "/" not in rest:
        return f"domain/{rest}"
    ident = SpiffeId.parse(canonical)
    return f"id/{ident.trust_domain}/{ident.namespace}/{ident.service_account}"


def key_for(entry: str) -> str:
    return DENIED_PREFIX + key_suffix(entry)


def encode(denial: Denial) -> bytes:
    body = {"entry": denial.entry, "reason": denial.reason, "created": denial.created}
    if denial.cluster:
        body["cluster"] = denial.cluster
    return json.dumps(body, sort_keys=True).encode()


def new_denial(entry: str, reason: str, now: dt.datetime, cluster: str = "") -> Denial:
    return Denial(normalize_denial(entry), reason, now.isoformat(), cluster)


def decode(suffix: str, value: bytes | str) -> Denial:
    """One stored entry; ValueError naming what is wrong (the key and value must agree)."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    text = text.strip()
    if text.startswith(SPIFFE):
        denial = Denial(normalize_denial(text))
    else:
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise ValueError(f"denied/{suffix}: value is neither JSON nor a spiffe:// URI") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("entry"), str):
            raise ValueError(f"denied/{suffix}: value has no 'entry' string")
        denial = Denial(
            normalize_denial(obj["entry"]),
            str(obj.get("reason", "")),
            str(obj.get("created", "")),
            str(obj.get("cluster", "")),
        )
    if key_suffix(denial.entry) != suffix:
        raise ValueError(f"denied/{suffix}: key does not match entry {denial.entry}")
    return denial


def entries_from_config(denied: Mapping[str, str | bytes]) -> tuple[tuple[str, ...], list[str]]:
    """(sorted deny entries, problems) from `FederationConfig.denied` (suffix -> value).
    A malformed entry is reported and skipped: it must not stop the rest of the list."""
    entries: set[str] = set()
    problems: list[str] = []
    for suffix, value in sorted(denied.items()):
        try:
            entries.add(decode(suffix, value).entry)
        except ValueError as e:
            problems.append(str(e))
    return tuple(sorted(entries)), problems
