"""RFC 6902 JSON Patch between two JSON documents, and applying one in place.

`diff(original, injected)` is what the admission webhook answers with; `apply` replays the same
operations on the YAML the CLI read (ruamel's round-trip maps and sequences), so the CLI's
output and the webhook's patch come from one computation, and the parts of a manifest the patch
does not touch keep their comments and key order.

The diff recurses into mappings and into lists of equal length. A list that grew around its old
elements (the injected init containers go in front, the identity volume at the end) gets `add`
operations at indices, leaving the old elements and their comments alone; any other list change
replaces the list. Paths are JSON Pointers (RFC 6901: `~` is `~0`, `/` is `~1`, so the
annotation `fedgate.io/injected` is `.../annotations/fedgate.io~1injected`).
"""

from __future__ import annotations

import copy
from collections.abc import MutableMapping, MutableSequence
from typing import Any

Operation = dict[str, Any]


def pointer(parts: tuple[str | int, ...]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _grown_at(old: list[Any], new: list[Any]) -> int | None:
    """The offset at which `old` sits, unchanged, inside the longer `new`, if it does."""
    for start in range(len(new) - len(old) + 1):
        if new[start : start + len(old)] == old:
            return start
    return None


def diff(old: Any, new: Any, at: tuple[str | int, ...] = ()) -> list[Operation]:
    """Operations turning `old` into `new` (both plain JSON data)."""
    if isinstance(old, dict) and isinstance(new, dict):
        ops: list[Operation] = [
            {"op": "remove", "path": pointer((*at, k))} for k in old if k not in new
        ]
        for k, v in new.items():
            if k not in old:
                ops.append({"op": "add", "path": pointer((*at, k)), "value": v})
            else:
                ops += diff(old[k], v, (*at, k))
        return ops
    if isinstance(old, list) and isinstance(new, list):
        if len(old) == len(new):
            return [
                op
                for i, (a, b) in enumerate(zip(old, new, strict=True))
                for op in diff(a, b, (*at, i))
            ]
        start = _grown_at(old, new) if len(new) > len(old) else None
        if start is not None:
            front = [
                {"op": "add", "path": pointer((*at, i)), "value": new[i]} for i in range(start)
            ]
            back = [
                {"op": "add", "path": pointer((*at, i)), "value": new[i]}
                for i in range(start + len(old), len(new))
            ]
            return front + back
    if old == new and type(old) is type(new):
        return []
    return [{"op": "replace", "path": pointer(at), "value": new}]


def _parent(doc: Any, path: str) -> tuple[Any, str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON Pointer {path!r} does not start with /")
    tokens = [_unescape(t) for t in path[1:].split("/")]
    node = doc
    for token in tokens[:-1]:
        node = node[int(token)] if isinstance(node, MutableSequence) else node[token]
    return node, tokens[-1]


def apply(doc: Any, ops: list[Operation]) -> Any:
    """Apply `ops` (add, remove, replace) to `doc` in place and return it; the root itself
    (path "") is replaced by returning the new value."""
    for op in ops:
        value = copy.deepcopy(op.get("value"))
        if op["path"] == "":
            if op["op"] != "replace":
                raise ValueError(f"unsupported root operation {op['op']!r}")
            doc = value
            continue
        node, key = _parent(doc, op["path"])
        match op["op"], node:
            case "add", MutableSequence():
                node.insert(len(node) if key == "-" else int(key), value)
            case "replace", MutableSequence():
                node[int(key)] = value
            case "remove", MutableSequence():
                del node[int(key)]
            case (("add" | "replace"), MutableMapping()):
                node[key] = value
            case "remove", MutableMapping():
                del node[key]
            case _:
                raise ValueError(f"cannot {op['op']} at {op['path']!r}")
    return doc
