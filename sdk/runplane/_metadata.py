"""Run metadata from inside a task (SPEC §7, reference §9.2): ``from runplane import metadata``.

Updates are synchronous and chainable; they change this attempt's copy at once and are buffered,
then sent (about once a second, on ``await metadata.flush()`` and at the end of the attempt,
before its result) to the scheduler, which applies each flush as one run update. Outside a task
every call is a no-op (``get`` returns None, ``current`` an empty dict).

``metadata.parent.*`` and ``metadata.root.*`` update the parent and root run (set, delete,
append, remove, increment, decrement); they are no-ops on a run without one.

Operations are (type, key, value) triples; :func:`apply_operations` is the one implementation of
their meaning, used by the task (its copy) and by the scheduler (the stored object).
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from runplane._client import runs
from runplane._context import current_context
from runplane_core.metadata import Operation, apply_operations


class AttemptMetadata:
    """An attempt's metadata: its run's copy and the operations not yet sent, per target run."""

    def __init__(self, run_id: str, initial: dict[str, Any]) -> None:
        self.run_id = run_id
        self.current = initial
        self._pending: dict[str, list[Operation]] = {}
        self._lock = threading.Lock()  # plain def tasks update from their threads

    def add(self, target: str, operation: Operation) -> None:
        with self._lock:
            if target == self.run_id:
                self.current = apply_operations(self.current, [operation])
            self._pending.setdefault(target, []).append(operation)

    def rebase(self, stored: dict[str, Any]) -> None:
        """The run's metadata as stored, with the operations not yet sent applied over it."""
        with self._lock:
            self.current = apply_operations(stored, self._pending.get(self.run_id, []))

    def take_pending(self) -> dict[str, list[Operation]]:
        with self._lock:
            pending, self._pending = self._pending, {}
            return pending


def _attempt() -> AttemptMetadata | None:
    ctx = current_context()
    if ctx is None:
        return None
    md = ctx.extra.get("metadata")
    return md if isinstance(md, AttemptMetadata) else None


class _Updates:
    """The update methods, aimed at one run (this one, the parent or the root)."""

    def _target(self) -> tuple[AttemptMetadata, str] | None:
        md = _attempt()
        return None if md is None else (md, md.run_id)

    def _add(self, kind: str, key: str, value: Any) -> _Updates:
        found = self._target()
        if found is not None:
            md, target = found
            md.add(target, (kind, key, value))
        return self

    def set(self, key: str, value: Any) -> _Updates:
        return self._add("set", key, value)

    def delete(self, key: str) -> _Updates:
        return self._add("delete", key, None)

    def append(self, key: str, value: Any) -> _Updates:
        return self._add("append", key, value)

    def remove(self, key: str, value: Any) -> _Updates:
        return self._add("remove", key, value)

    def increment(self, key: str, amount: float = 1) -> _Updates:
        return self._add("increment", key, amount)

    def decrement(self, key: str, amount: float = 1) -> _Updates:
        return self._add("increment", key, -amount)


class _Related(_Updates):
    def __init__(self, field: str) -> None:
        self._field = field

    def _target(self) -> tuple[AttemptMetadata, str] | None:
        ctx = current_context()
        md = _attempt()
        if ctx is None or md is None:
            return None
        target = getattr(ctx.run, self._field)
        return None if not target else (md, target)


class Metadata(_Updates):
    """``metadata``: this run's metadata (see the module docstring)."""

    parent = _Related("parent_run_id")
    root = _Related("root_run_id")

    def get(self, key: str) -> Any:
        md = _attempt()
        return None if md is None else copy.deepcopy(md.current.get(key))

    def current(self) -> dict[str, Any]:
        md = _attempt()
        return {} if md is None else copy.deepcopy(md.current)

    def replace(self, value: dict[str, Any]) -> Metadata:
        if not isinstance(value, dict):
            raise TypeError("metadata.replace takes a dict")
        self._add("replace", "", value)
        return self

    async def flush(self) -> None:
        """Send the buffered updates now (they are applied in order with the run's others)."""
        ctx = current_context()
        flush = ctx.extra.get("flush_metadata") if ctx is not None else None
        if flush is not None:
            flush()

    async def refresh(self) -> dict[str, Any]:
        """Reload this run's metadata from the scheduler (after updates made from elsewhere)."""
        md = _attempt()
        if md is None:
            return {}
        await self.flush()
        run = await runs.retrieve(md.run_id)
        md.rebase(run.metadata or {})
        return self.current()


metadata = Metadata()
