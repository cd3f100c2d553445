"""The meaning of run metadata operations, in one place: the task applies them to its copy and the
scheduler to the stored object.

Operations are (type, key, value) triples: set, delete, append, remove, increment, replace.
"""

from __future__ import annotations

import copy
from typing import Any

Operation = tuple[str, str, Any]


def apply_operations(doc: dict[str, Any], operations: list[Operation]) -> dict[str, Any]:
    """``doc`` after the operations, in order (``doc`` itself is not changed).

    append on a missing key makes a list; on a non-list value makes ``[old, value]``. remove
    drops every equal element of a list. increment on a missing key starts from 0."""
    out = copy.deepcopy(doc)
    for kind, key, value in operations:
        if kind == "set":
            out[key] = value
        elif kind == "delete":
            out.pop(key, None)
        elif kind == "append":
            old = out.get(key)
            out[key] = (
                [*old, value]
                if isinstance(old, list)
                else [value]
                if old is None
                else [
                    old,
                    value,
                ]
            )
        elif kind == "remove":
            old = out.get(key)
            if isinstance(old, list):
                out[key] = [v for v in old if v != value]
        elif kind == "increment":
            old = out.get(key)
            base = old if isinstance(old, int | float) and not isinstance(old, bool) else 0
            out[key] = base + value
        elif kind == "replace":
            if not isinstance(value, dict):
                raise TypeError("metadata.replace takes a dict")
            out = copy.deepcopy(value)
        else:
            raise ValueError(f"unknown metadata operation {kind!r}")
    return out
