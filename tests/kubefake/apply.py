"""Server-side apply (`PATCH` with `application/apply-patch+yaml`), simplified but honest.

Each field manager owns the leaf fields it applied. An apply sets every field in the applied
configuration, removes the fields the manager applied last time and no longer sends (unless
another manager owns them too), and leaves every other manager's fields alone. A field owned by
another manager with a different value is a conflict (409) unless `force=true`, which takes it
over. Ownership is rendered into `metadata.managedFields` in the real `FieldsV1` shape.

Lists are atomic, except the associative lists the served schemas declare as
`x-kubernetes-list-type: map` that matter here: `status.conditions`, keyed by `type` (the MCS
CRDs and metav1.Condition), and a webhook configuration's `webhooks`, keyed by `name`. Their
items are merged by key, so two managers can each own their own conditions (or fields of a
webhook); an item a manager stops applying goes when no one else owns part of it.
`metadata` contributes only labels and annotations.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from tests.kubefake.resources import Obj

Path = tuple[str, ...]
Managed = dict[str, set[Path]]  # manager -> the leaf paths it owns
# Associative lists: list path -> key field. An item is the path segment `k:<field>=<value>`.
LIST_MAP_KEYS: dict[Path, str] = {("status", "conditions"): "type", ("webhooks",): "name"}


def leaves(config: Obj, subresource: str) -> set[Path]:
    """The leaf paths an applied configuration sets (for `status`, only under status)."""
    return set(_leaves_in_order(config, subresource))


def _leaves_in_order(config: Obj, subresource: str) -> list[Path]:
    """`leaves` in the configuration's order: new items of an associative list are added in
    the order the applier sent them, as the real server keeps them."""
    out: list[Path] = []

    def walk(value: Any, path: Path) -> None:
        key = LIST_MAP_KEYS.get(path)
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, (*path, k))
        elif (
            key and isinstance(value, list) and all(isinstance(i, dict) and key in i for i in value)
        ):
            for item in value:
                for k, v in item.items():
                    walk(v, (*path, f"k:{key}={item[key]}", k))
        else:
            out.append(path)

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


def _child(cur: Any, seg: str, create: bool, item_next: bool) -> Any:
    """`cur`'s child `seg` (a field, or a `k:` list item); created if missing and `create`."""
    if seg.startswith("k:"):
        if not isinstance(cur, list):
            return None
        field, _, value = seg[2:].partition("=")
        found = next((i for i in cur if isinstance(i, dict) and str(i.get(field)) == value), None)
        if found is None and create:
            found = {field: value}
            cur.append(found)
        return found
    if not isinstance(cur, dict):
        return None
    nxt = cur.get(seg)
    if create and not isinstance(nxt, list if item_next else dict):
        nxt = cur[seg] = [] if item_next else {}
    return nxt


def _get(obj: Obj, path: Path) -> Any:
    cur: Any = obj
    for p in path:
        if not p.startswith("k:") and (not isinstance(cur, dict) or p not in cur):
            return None
        cur = _child(cur, p, False, False)
        if cur is None:
            return None
    return cur


def _set(obj: Obj, path: Path, value: Any) -> None:
    cur: Any = obj
    for i, p in enumerate(path[:-1]):
        cur = _child(cur, p, True, path[i + 1].startswith("k:"))
    cur[path[-1]] = copy.deepcopy(value)


def _is_item_key(path: Path) -> bool:
    return len(path) >= 2 and path[-2].startswith(f"k:{path[-1]}=")


def _remove(obj: Obj, path: Path) -> None:
    chain: list[tuple[Any, str, Any]] = []  # (parent, segment, child)
    cur: Any = obj
    for p in path[:-1]:
        nxt = _child(cur, p, False, False)
        if nxt is None:
            return
        chain.append((cur, p, nxt))
        cur = nxt
    if isinstance(cur, dict):
        cur.pop(path[-1], None)
    for parent, seg, child in reversed(chain):  # prune what the removal left empty
        if child not in ({}, []):
            break
        if isinstance(parent, list):
            parent.remove(child)
        else:
            del parent[seg]


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
    # An item's key field goes last: removing it first would lose the item's other fields.
    for p in sorted(managed.get(manager, set()) - wanted - others, key=_is_item_key):
        _remove(new, p)
    for p in _leaves_in_order(config, subresource):
        _set(new, p, _get(config, p))
    managed[manager] = wanted
    return new


def fields_v1(paths: set[Path]) -> Obj:
    """Ownership in the `FieldsV1` trie shape (`{"f:spec": {"f:ips": {}}}`)."""
    root: Obj = {}
    for path in sorted(paths):
        cur = root
        for p in path:
            if p.startswith("k:"):
                field, _, value = p[2:].partition("=")
                cur = cur.setdefault("k:" + json.dumps({field: value}, separators=(",", ":")), {})
                cur["."] = {}
            else:
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
