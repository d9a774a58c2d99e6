"""An informer's pure parts: the object cache a list/watch keeps, and backoff with jitter.

`ObjectCache` holds one resource's objects keyed by (namespace, name) and the resourceVersion
to resume watching from. The informer feeds it a list (`replace`) and then watch events
(`apply`); it makes no decision about connections and does no I/O. Its rules:

* `replace(items, rv)` (after a LIST, including a relist after 410 Gone) makes the cache equal
  to the list: objects missing from it are deleted (nothing lost while the watch was down), and
  an object whose uid and resourceVersion are unchanged is not counted as a change (nothing
  applied twice). It returns the number of real changes.
* `apply(type, obj)` applies one watch event. ADDED/MODIFIED upsert, DELETED removes; an event
  carrying exactly the (uid, resourceVersion) the cache already holds is a duplicate and is
  skipped (counted in `duplicates`); BOOKMARK only advances the resume version. Versions are
  compared for equality only: the API says they are opaque, never ordered.

`Backoff` is client-go's `wait.Backoff` with `Jitter`: each delay is
`min(cap, initial * factor**n) * (1 + jitter * U[0,1))`, reset after a success.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clusters.kube.translate import Key, key_of

Obj = Mapping[str, Any]


def _version(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("uid") or ""), str(meta.get("resourceVersion") or ""))


class InvalidEventError(Exception):
    """A watch event the cache cannot apply (unknown type, object without a name)."""


@dataclass(slots=True)
class ObjectCache:
    kind: str
    objects: dict[Key, Obj] = field(default_factory=dict)
    resource_version: str = ""  # where the next watch resumes; "" until the first list
    synced: bool = False  # a list has been applied (client-go's HasSynced)
    lists: int = 0
    applied: int = 0
    duplicates: int = 0

    def replace(self, items: Iterable[Obj], resource_version: str) -> int:
        fresh = {key_of(o): o for o in items}
        changes = sum(1 for k in self.objects if k not in fresh)
        changes += sum(
            1
            for k, o in fresh.items()
            if k not in self.objects or _version(self.objects[k]) != _version(o)
        )
        self.objects = fresh
        self.resource_version = resource_version
        self.synced = True
        self.lists += 1
        self.applied += changes
        return changes

    def apply(self, type_: str, obj: Obj) -> bool:
        """Apply one watch event; True if the cache changed."""
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if type_ == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return False
        key = key_of(obj)
        if not key[1] or type_ not in ("ADDED", "MODIFIED", "DELETED"):
            raise InvalidEventError(f"{self.kind}: cannot apply a {type_} event for {key}")
        if rv:
            self.resource_version = rv
        held = self.objects.get(key)
        if type_ == "DELETED":
            if held is None:
                self.duplicates += 1
                return False
            del self.objects[key]
        elif held is not None and _version(held) == _version(obj):
            self.duplicates += 1
            return False
        else:
            self.objects[key] = obj
        self.applied += 1
        return True


@dataclass(slots=True)
class Backoff:
    initial: float = 0.2
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 1.0
    rng: random.Random = field(default_factory=random.Random)
    _steps: int = 0

    def next(self) -> float:
        base = min(self.cap, self.initial * self.factor**self._steps)
        self._steps += 1
        return base * (1.0 + self.jitter * self.rng.random())

    def reset(self) -> None:
        self._steps = 0


@dataclass(slots=True)
class SyncOutcomes:
    """A level-triggered sync loop's bookkeeping (the MCS write-back, the bootstrap writer):
    its failures and last error for /config, and how long to wait before the next run."""

    resync: float
    backoff: Backoff
    failures: int = 0
    last_error: str = ""

    def failed(self, e: Exception) -> float:
        """Count the failure; the (backed-off) delay before the retry."""
        self.failures += 1
        self.last_error = str(e)
        return self.backoff.next()

    def succeeded(self) -> float:
        """Reset the backoff; the delay before the next resync."""
        self.backoff.reset()
        self.last_error = ""
        return self.resync
