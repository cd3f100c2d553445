"""JSON encoding of payloads, outputs and metadata (pydantic models, dataclasses, datetimes)."""

from __future__ import annotations

from typing import Any

import orjson


def _default(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        return dump(mode="json")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(value: Any) -> str:
    return orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS).decode()


def loads(text: str) -> Any:
    return orjson.loads(text) if text else None
