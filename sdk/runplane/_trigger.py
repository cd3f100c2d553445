"""Triggering: the options of a trigger as the API carries them, and the TriggerRun and
BatchTriggerRuns calls that ``tasks``, ``batch`` and :class:`runplane.Task` share."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from runplane import _durations, _idempotency
from runplane._context import current_context
from runplane._durations import DurationLike
from runplane._errors import ConfigurationError
from runplane._models import BatchHandle, Run, RunHandle
from runplane._serde import dumps
from runplane._transport import Transport
from runplane.v1 import run_service_pb2 as rpb


def trigger_options(
    *,
    queue: Any = None,
    tags: Sequence[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
    max_attempts: int | None = None,
    idempotency_key: str | Sequence[str] | None = None,
    idempotency_key_ttl: DurationLike | None = None,
    concurrency_key: str | int | None = None,
    priority: int | None = None,
    delay: DurationLike | datetime | None = None,
    ttl: DurationLike | None = None,
    max_duration: DurationLike | None = None,
    machine: str | None = None,
    debounce: dict[str, Any] | None = None,
    version: str | None = None,
) -> rpb.TriggerOptions:
    """The options of one trigger (SPEC §3), as the API carries them.

    ``delay`` is a duration or a datetime; ``ttl=0`` opts out of the task's ttl; a plain-string
    ``idempotency_key`` is scoped to the current run when called inside one (see
    :func:`runplane.idempotency_keys.create`). Called inside a run, the new run is its child
    (and runs on the parent's worker version when it defines the task). ``version`` locks the
    run to that registered worker version instead of the task's current one."""
    if isinstance(tags, str):
        tags = [tags]
    options = rpb.TriggerOptions(
        queue=getattr(queue, "name", queue) or "",
        tags=list(tags or []),
        metadata=dumps(metadata) if metadata is not None else "",
        max_attempts=max_attempts or 0,
        idempotency_key=_idempotency.resolve(idempotency_key),
        concurrency_key=str(concurrency_key) if concurrency_key is not None else "",
        priority=priority or 0,
        machine=machine or "",
        version=version or "",
    )
    if isinstance(delay, datetime):
        options.delay_until.CopyFrom(_durations.timestamp_pb(delay))
    elif delay is not None:
        options.delay.CopyFrom(_durations.to_pb(delay, "delay"))
    if ttl is not None:
        options.ttl.CopyFrom(_durations.to_pb(ttl, "ttl"))
    if idempotency_key_ttl is not None:
        options.idempotency_key_ttl.CopyFrom(
            _durations.to_pb(idempotency_key_ttl, "idempotency_key_ttl")
        )
    if max_duration is not None:
        options.max_duration.CopyFrom(_durations.to_pb(max_duration, "max_duration"))
    if debounce is not None:
        options.debounce.CopyFrom(_debounce(debounce))
    ctx = current_context()
    if ctx is not None:
        options.parent_run_id = ctx.run.id
    return options


def _debounce(value: dict[str, Any]) -> rpb.Debounce:
    """``{"key": ..., "delay": "5s", "mode": "leading"|"trailing", "max_delay": "1m"}``."""
    unknown = set(value) - {"key", "delay", "mode", "max_delay"}
    if unknown or "key" not in value or "delay" not in value:
        raise ConfigurationError(
            'debounce is {"key": ..., "delay": ..., "mode": "leading"|"trailing", '
            f'"max_delay": ...}}, got {value!r}'
        )
    mode = value.get("mode", "leading")
    if mode not in ("leading", "trailing"):
        raise ConfigurationError(f'debounce mode is "leading" or "trailing", got {mode!r}')
    d = rpb.Debounce(
        key=str(value["key"]),
        mode=rpb.DEBOUNCE_MODE_TRAILING if mode == "trailing" else rpb.DEBOUNCE_MODE_LEADING,
    )
    d.delay.CopyFrom(_durations.to_pb(value["delay"], "debounce.delay"))
    if value.get("max_delay") is not None:
        d.max_delay.CopyFrom(_durations.to_pb(value["max_delay"], "debounce.max_delay"))
    return d


def child_item(task_id: str, payload: Any, options: dict[str, Any]) -> rpb.BatchTriggerItem:
    """One child run to trigger from inside a run, as the API carries it."""
    return rpb.BatchTriggerItem(
        task_id=task_id, payload=dumps(payload), options=trigger_options(**options)
    )


def task_items(task_id: str, items: Sequence[Any]) -> list[dict[str, Any]]:
    """Batch items of one task (``{"payload": ..., "options": {...}}``) as :func:`batch_trigger`
    takes them."""
    return [{"id": task_id, **_as_item(item)} for item in items]


def _as_item(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict) or "payload" not in item:
        raise ConfigurationError('a batch item is {"payload": ..., "options": {...}}')
    return {"payload": item["payload"], "options": item.get("options") or {}}


async def trigger(
    transport: Transport, task_id: str, payload: Any = None, **options: Any
) -> RunHandle:
    """Trigger a run of ``task_id``; the options are :func:`trigger_options`' arguments."""
    request = rpb.TriggerRunRequest(
        task_id=task_id, payload=dumps(payload), options=trigger_options(**options)
    )
    response = await transport.call(transport.run_stub().TriggerRun, request)
    return RunHandle(
        id=response.run.id,
        is_cached=response.is_cached,
        run=Run.from_pb(response.run),
        public_access_token=response.public_access_token,
    )


async def batch_trigger(
    transport: Transport, items: Sequence[dict[str, Any]], idempotency_key: str | None = None
) -> BatchHandle:
    """Trigger ``[{"id": task_id, "payload": ..., "options": {...}}, ...]`` in one
    transaction."""
    request = rpb.BatchTriggerRunsRequest(idempotency_key=idempotency_key or "")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item:
            raise ConfigurationError(
                f'batch item {i}: expected {{"id": ..., "payload": ..., "options": {{...}}}}'
            )
        request.items.append(
            rpb.BatchTriggerItem(
                task_id=item["id"],
                payload=dumps(item.get("payload")),
                options=trigger_options(**(item.get("options") or {})),
            )
        )
    response = await transport.call(transport.run_stub().BatchTriggerRuns, request)
    return BatchHandle(
        batch_id=response.batch_id,
        runs=[
            RunHandle(id=pb.id, is_cached=cached, run=Run.from_pb(pb))
            for pb, cached in zip(response.runs, response.is_cached, strict=True)
        ],
    )
