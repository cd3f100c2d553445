"""How deep a JSON text nests: values deeper than the limit are refused where they enter (a
trigger's payload, metadata, token data, an attempt's output), because every reader must be able
to decode them, and Python's own ``json`` (SSE) gives up near 1,000 levels."""

from __future__ import annotations

from typing import Any

import orjson


def too_deep(text: str, limit: int) -> bool:
    """``text`` (valid JSON) nests arrays and objects more than ``limit`` deep."""
    if text.count("[") + text.count("{") <= limit:
        return False  # too few brackets to nest that deep: the common case, at C speed
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return True  # deeper than orjson's own limit of 1,024
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if level > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, level + 1) for c in children if isinstance(c, dict | list))
    return False
