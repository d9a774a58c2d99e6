"""Root rotation of one cluster CA, pure: which roots it publishes and which one issues at `now`.

A cluster CA holds several roots over time. Each is in one state:

| state    | published in ClusterInfo.roots | issues SVIDs | leaves the state when               |
|----------|--------------------------------|--------------|-------------------------------------|
| pending  | yes                            | no           | `activate(it)`: -> active           |
| active   | yes                            | yes          | another root is activated: retiring |
| retiring | while `now < retire_at`        | no           | `prune(now)` after `retire_at`      |

Exactly one root is active. The procedure (`fedgate ca rotate`, docs/identity.md):

1. `prepare`: a new root is added as pending. The agent publishes it beside the active one; one
   config push later every verifier trusts both (trust bundles hold several roots per domain).
2. `activate`, once the new root has propagated: issuance switches to it; the old root becomes
   retiring with `retire_at = now + max_svid_ttl + grace`. Every SVID the old root signed
   expires before then, and every workload renews at half life onto the new root.
3. After `retire_at` the old root is no longer published (a push removes it everywhere);
   `prune` drops it from the plan and its files can go.

Nothing here reads a clock or a file: `now` comes in, a new immutable plan comes out
(`ca.cadir` stores it; the agent evaluates it on every tick).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ca.errors import RotationError

PENDING = "pending"
ACTIVE = "active"
RETIRING = "retiring"
STATES = (PENDING, ACTIVE, RETIRING)

DEFAULT_GRACE = dt.timedelta(seconds=60)  # clock skew and in-flight renewals


@dataclass(frozen=True, slots=True)
class RootEntry:
    id: str  # `ca.authority.root_id`: the root's SHA-256 fingerprint, 16 hex digits
    state: str
    added: dt.datetime
    retire_at: dt.datetime | None = None

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise RotationError(f"root {self.id}: unknown state {self.state!r}")
        if (self.state == RETIRING) != (self.retire_at is not None):
            raise RotationError(f"root {self.id}: retire_at is set exactly when retiring")

    def published_at(self, now: dt.datetime) -> bool:
        return self.retire_at is None or now < self.retire_at


@dataclass(frozen=True, slots=True)
class RootPlan:
    """Every root of one CA and the longest SVID lifetime it issues."""

    max_svid_ttl: dt.timedelta
    roots: tuple[RootEntry, ...]

    def __post_init__(self) -> None:
        active = [r for r in self.roots if r.state == ACTIVE]
        if len(active) != 1:
            raise RotationError(f"a CA must have exactly one active root, has {len(active)}")
        if len({r.id for r in self.roots}) != len(self.roots):
            raise RotationError("a root is listed twice")
        if self.max_svid_ttl <= dt.timedelta(0):
            raise RotationError("max SVID TTL must be positive")

    @classmethod
    def single(cls, root: str, now: dt.datetime, max_svid_ttl: dt.timedelta) -> RootPlan:
        return cls(max_svid_ttl, (RootEntry(root, ACTIVE, now),))

    @property
    def active(self) -> RootEntry:
        return next(r for r in self.roots if r.state == ACTIVE)

    @property
    def pending(self) -> RootEntry | None:
        return next((r for r in self.roots if r.state == PENDING), None)

    def entry(self, root: str) -> RootEntry | None:
        return next((r for r in self.roots if r.id == root), None)

    def published(self, now: dt.datetime) -> tuple[RootEntry, ...]:
        """The roots to publish at `now`: active first, then pending, then retiring ones."""
        order = {ACTIVE: 0, PENDING: 1, RETIRING: 2}
        live = [r for r in self.roots if r.published_at(now)]
        return tuple(sorted(live, key=lambda r: (order[r.state], r.added, r.id)))

    def next_change(self, now: dt.datetime) -> dt.datetime | None:
        """When `published` changes next by time alone (a retiring root drops out)."""
        times = [r.retire_at for r in self.roots if r.retire_at is not None and r.retire_at > now]
        return min(times, default=None)

    # --- transitions ------------------------------------------------------------------------

    def prepare(self, root: str, now: dt.datetime) -> RootPlan:
        """Add `root` as pending (published, not issuing)."""
        if self.pending is not None:
            raise RotationError(
                f"root {self.pending.id} is already pending: activate it "
                "(`fedgate ca rotate --activate`) or abort that rotation first"
            )
        if self.entry(root) is not None:
            raise RotationError(f"root {root} is already in this CA")
        return replace(self, roots=(*self.roots, RootEntry(root, PENDING, now)))

    def activate(
        self, root: str, now: dt.datetime, grace: dt.timedelta = DEFAULT_GRACE
    ) -> RootPlan:
        """Switch issuance to pending `root`; the active one retires after the longest SVID
        lifetime (plus `grace`) from now."""
        entry = self.entry(root)
        if entry is None or entry.state != PENDING:
            raise RotationError(f"root {root} is not pending (prepare a rotation first)")
        retire_at = now + self.max_svid_ttl + grace
        roots = []
        for r in self.roots:
            if r.id == root:
                roots.append(replace(r, state=ACTIVE))
            elif r.state == ACTIVE:
                roots.append(replace(r, state=RETIRING, retire_at=retire_at))
            else:
                roots.append(r)
        return replace(self, roots=tuple(roots))

    def abort(self) -> RootPlan:
        """Drop a pending root (it never issued anything)."""
        if self.pending is None:
            raise RotationError("no rotation is pending")
        return replace(self, roots=tuple(r for r in self.roots if r.state != PENDING))

    def prune(self, now: dt.datetime) -> tuple[RootPlan, tuple[str, ...]]:
        """Drop roots no longer published; returns the new plan and the dropped ids."""
        gone = tuple(r.id for r in self.roots if not r.published_at(now))
        return replace(self, roots=tuple(r for r in self.roots if r.id not in gone)), gone


# --- JSON (the `ca.json` manifest) -----------------------------------------------------------


def _time(value: Any, what: str) -> dt.datetime:
    if not isinstance(value, str):
        raise RotationError(f"{what} must be an ISO 8601 time")
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as e:
        raise RotationError(f"{what}: {e}") from e
    if parsed.tzinfo is None:
        raise RotationError(f"{what} must carry a time zone")
    return parsed


def plan_to_json(plan: RootPlan) -> dict[str, Any]:
    return {
        "version": 1,
        "maxSvidTtlSeconds": int(plan.max_svid_ttl.total_seconds()),
        "roots": [
            {
                "id": r.id,
                "state": r.state,
                "added": r.added.isoformat(),
                "retireAt": r.retire_at.isoformat() if r.retire_at else None,
            }
            for r in plan.roots
        ],
    }


def plan_from_json(obj: Mapping[str, Any]) -> RootPlan:
    if obj.get("version") != 1:
        raise RotationError(f"unsupported CA manifest version {obj.get('version')!r}")
    ttl = obj.get("maxSvidTtlSeconds")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
        raise RotationError("maxSvidTtlSeconds must be a positive integer")
    roots = obj.get("roots")
    if not isinstance(roots, list):
        raise RotationError("roots must be a list")
    entries = []
    for i, r in enumerate(roots):
        if not isinstance(r, dict) or not isinstance(r.get("id"), str):
            raise RotationError(f"roots[{i}] must be an object with an id")
        retire = r.get("retireAt")
        entries.append(
            RootEntry(
                id=r["id"],
                state=str(r.get("state")),
                added=_time(r.get("added"), f"roots[{i}].added"),
                retire_at=None if retire is None else _time(retire, f"roots[{i}].retireAt"),
            )
        )
    return RootPlan(dt.timedelta(seconds=ttl), tuple(entries))
