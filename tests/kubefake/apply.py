"""Server-side apply (`PATCH` with `application/apply-patch+yaml`), simplified but honest.

Each field manager owns the leaf fields it applied. An apply sets every field in the applied
configuration, removes the fields the manager applied last time and no longer sends (unless
another manager owns them too), and leaves every other manager's fields alone. A field owned by
another manager with a different value is a conflict (409) unless `force=true`, which takes it
over. Ownership is rendered into `metadata.managedFields` in the real `FieldsV1` shape.

Simplification: lists are atomic (the real server merges associative lists such as
`status.conditions` by their key); `metadata` contributes only labels and annotations.
"""

from __future__ import annotations

import copy
from typing import Any

from tests.kubefake.resources import Obj

Path = tuple[str, ...]
Managed = dict[str, set[Path]]  # manager -> the leaf paths it owns


def leaves(config: Obj, subresource: str) -> set[Path]:
    """The leaf paths an applied configuration sets (for `status`, only under status)."""
    out: set[Path] = set()

    def walk(value: Any, path: Path) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, (*path, k))
        else:
            out.add(path)

    for key, value in config.items():
        if key in ("apiVersion", "kind"):
            continue
        if key == "metadata":
            for sub in ("labels", "annotations"):
                for k, v in (value.get(sub) or {}).items():
                    walk(v, ("metadata", sub, k))
        elif (key == "status") == (subresource == "status"):
            walk(value, (key,))
    return out


def _get(obj: Obj, path: Path) -> Any:
    cur: Any = obj
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur


def _set(obj: Obj, path: Path, value: Any) -> None:
    cur = obj
    for p in path[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = cur[p] = {}
        cur = nxt
    cur[path[-1]] = copy.deepcopy(value)


def _remove(obj: Obj, path: Path) -> None:
    parents = []
    cur: Any = obj
    for p in path[:-1]:
        if not isinstance(cur, dict) or p not in cur:
            return
        parents.append((cur, p))
        cur = cur[p]
    if isinstance(cur, dict):
        cur.pop(path[-1], None)
    for parent, key in reversed(parents):  # prune maps the removal left empty
        if parent[key] == {}:
            del parent[key]


class ApplyConflictError(Exception):
    def __init__(self, conflicts: list[tuple[str, Path]]) -> None:
        self.conflicts = conflicts
        super().__init__(
            f"Apply failed with {len(conflicts)} conflict"
            + ("s" if len(conflicts) > 1 else "")
            + ": "
            + "; ".join(
                f'conflict with "{m.partition("|")[0]}": .{".".join(p)}' for m, p in conflicts
            )
        )


def apply(
    existing: Obj, config: Obj, managed: Managed, manager: str, subresource: str, force: bool
) -> Obj:
    """The object after `manager` applies `config`; updates `managed` in place."""
    new = copy.deepcopy(existing)
    wanted = leaves(config, subresource)
    conflicts = [
        (other, p)
        for other, owned in managed.items()
        if other != manager
        for p in sorted(owned & wanted)
        if _get(existing, p) != _get(config, p)
    ]
    if conflicts and not force:
        raise ApplyConflictError(conflicts)
    for other, p in conflicts:
        managed[other].discard(p)
    others = set().union(*(o for m, o in managed.items() if m != manager))
    for p in managed.get(manager, set()) - wanted - others:
        _remove(new, p)
    for p in wanted:
        _set(new, p, _get(config, p))
    managed[manager] = wanted
    return new


def fields_v1(paths: set[Path]) -> Obj:
    """Ownership in the `FieldsV1` trie shape (`{"f:spec": {"f:ips": {}}}`)."""
    root: Obj = {}
    for path in sorted(paths):
        cur = root
        for p in path:
            cur = cur.setdefault(f"f:{p}", {})
    return root


def managed_fields(managed: Managed, api_version: str, stamps: dict[str, str]) -> list[Obj]:
    """`metadata.managedFields`: one entry per (manager, subresource); keys are `manager` or
    `manager|status`."""
    out = []
    for key, paths in sorted(managed.items()):
        if not paths:
            continue
        manager, _, subresource = key.partition("|")
        entry: Obj = {
            "manager": manager,
            "operation": "Apply",
            "apiVersion": api_version,
            "time": stamps[key],
            "fieldsType": "FieldsV1",
            "fieldsV1": fields_v1(paths),
        }
        if subresource:
            entry["subresource"] = subresource
        out.append(entry)
    return out
