"""RunService: trigger, batch trigger, read, list, cancel, replay, reschedule, tags, metadata
and logs of runs, and a run's timeline."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from runplane.v1 import (
    run_pb2,
    run_service_pb2_grpc,
)
from runplane.v1 import (
    run_service_pb2 as rpb,
)
from runplane_common import auth
from runplane_common.auth import principal
from runplane_common.config import SchedulerSettings
from runplane_common.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from runplane_scheduler import keys, validation
from runplane_scheduler.api import Context
from runplane_scheduler.engine import RunEngine
from runplane_scheduler.keys import PublicTokens
from runplane_scheduler.states import FINAL, Status
from runplane_scheduler.store import RunRow, now_ms, run_to_pb, timestamp
from runplane_scheduler.store.errors import is_duplicate


class RunServicer(run_service_pb2_grpc.RunServiceServicer):
    def __init__(
        self, engine: RunEngine, settings: SchedulerSettings, tokens: PublicTokens | None = None
    ) -> None:
        self.engine = engine
        self.limits = settings.limits
        self.tokens = tokens

    async def TriggerRun(
        self, request: rpb.TriggerRunRequest, context: Context
    ) -> rpb.TriggerRunResponse:
        who = principal()
        auth.authorize_trigger(who, request.task_id)
        if who.is_public:
            auth.authorize_trigger_options(who, [f.name for f, _ in request.options.ListFields()])
        spec = validation.trigger(request, self.limits)
        guard = keys.SingleUse(who) if who.single_use else None
        try:
            row, cached = await self.engine.trigger(who.environment_id, spec, guard)
        except Exception as error:
            if guard is None or not is_duplicate(error):
                raise
            raise Unauthenticated(keys.SingleUse.USED) from None  # another scheduler took it
        run = run_to_pb(row)
        token = ""
        if self.tokens is not None:
            token = await self.tokens.read_token(who, "runs", run.id)
        return rpb.TriggerRunResponse(run=run, is_cached=cached, public_access_token=token)

    async def GetRun(self, request: rpb.GetRunRequest, context: Context) -> rpb.GetRunResponse:
        run_id = validation.run_id(request.run_id)
        who = principal()
        row = await self.engine.store.get_run(who.environment_id, run_id)
        if row is None:
            if who.is_public:  # a token learns nothing, not even whether a run exists
                raise PermissionDenied(f"this public access token may not read run {run_id}")
            raise NotFound(f"run {run_id} not found")
        run = run_to_pb(row)
        auth.authorize_read(who, run.id, run.tags, run.batch_id)
        return rpb.GetRunResponse(run=run)

    async def ListRuns(
        self, request: rpb.ListRunsRequest, context: Context
    ) -> rpb.ListRunsResponse:
        validation.filter_sizes(request, ("task_ids", "tags", "statuses"), self.limits)
        size = validation.page_size(request.page_size, self.limits.page_size)
        for i, t in enumerate(request.task_ids):
            validation.task_id(t, f"task_ids[{i}]")
        for i, tag in enumerate(request.tags):
            validation.text(f"tags[{i}]", tag, self.limits.tag_length)
        auth.authorize_list(principal(), request.tags, request.batch_id)
        filters = validation.page_filters(request)
        rows = await self.engine.store.list_runs(
            principal().environment_id,
            statuses=validation.statuses(list(request.statuses)),
            task_ids=list(request.task_ids),
            tags=list(request.tags),
            batch_id=validation.batch_id(request.batch_id) if request.batch_id else "",
            version=validation.version(request.version) if request.version else "",
            created_after=validation.timestamp_ms("created_after", request.created_after)
            if request.HasField("created_after")
            else None,
            created_before=validation.timestamp_ms("created_before", request.created_before)
            if request.HasField("created_before")
            else None,
            before_id=validation.decode_page_token(request.page_token, filters=filters),
            limit=size + 1,
        )
        more = len(rows) > size
        rows = rows[:size]
        return rpb.ListRunsResponse(
            runs=[run_to_pb(r) for r in rows],
            next_page_token=validation.encode_page_token(rows[-1].id, filters) if more else "",
        )

    async def CancelRun(
        self, request: rpb.CancelRunRequest, context: Context
    ) -> rpb.CancelRunResponse:
        run_id = validation.run_id(request.run_id)
        row = await self.engine.cancel(principal().environment_id, run_id)
        return rpb.CancelRunResponse(run=run_to_pb(row))

    async def BatchTriggerRuns(
        self, request: rpb.BatchTriggerRunsRequest, context: Context
    ) -> rpb.BatchTriggerRunsResponse:
        specs = validation.batch(request, self.limits)
        batch_id, rows, cached = await self.engine.batch_trigger(
            principal().environment_id, specs, request.idempotency_key
        )
        return rpb.BatchTriggerRunsResponse(
            batch_id=batch_id, runs=[run_to_pb(r) for r in rows], is_cached=cached
        )

    async def GetBatch(
        self, request: rpb.GetBatchRequest, context: Context
    ) -> rpb.GetBatchResponse:
        batch_id = validation.batch_id(request.batch_id)
        # Before the lookup: a token learns nothing of batches outside its scope.
        auth.authorize_batch(principal(), batch_id)
        batch, runs = await self.engine.store.get_batch(principal().environment_id, batch_id)
        final = [r.status for r in runs if Status(r.status) in FINAL]
        if len(final) < len(runs):
            status = rpb.BATCH_STATUS_PROCESSING
        elif all(s == Status.COMPLETED for s in final):
            status = rpb.BATCH_STATUS_COMPLETED
        else:
            status = rpb.BATCH_STATUS_PARTIAL_FAILED
        return rpb.GetBatchResponse(
            batch=rpb.Batch(
                id=batch.id,
                status=status,
                run_count=batch.run_count,
                run_ids=[r.id for r in runs],
                idempotency_key=batch.idempotency_key or "",
                created_at=timestamp(batch.created_at),
            )
        )

    async def ReplayRun(
        self, request: rpb.ReplayRunRequest, context: Context
    ) -> rpb.ReplayRunResponse:
        run_id = validation.run_id(request.run_id)
        row = await self.engine.replay(principal().environment_id, run_id)
        return rpb.ReplayRunResponse(run=run_to_pb(row))

    async def RescheduleRun(
        self, request: rpb.RescheduleRunRequest, context: Context
    ) -> rpb.RescheduleRunResponse:
        run_id = validation.run_id(request.run_id)
        if request.HasField("delay") == request.HasField("delay_until"):
            raise InvalidArgument("delay", "give exactly one of delay and delay_until")
        if request.HasField("delay"):
            delay_until = now_ms() + validation.duration_ms("delay", request.delay)
        else:
            delay_until = validation.timestamp_ms("delay_until", request.delay_until)
        row = await self.engine.reschedule(principal().environment_id, run_id, delay_until)
        return rpb.RescheduleRunResponse(run=run_to_pb(row))

    async def ResetIdempotencyKey(
        self, request: rpb.ResetIdempotencyKeyRequest, context: Context
    ) -> rpb.ResetIdempotencyKeyResponse:
        task = validation.task_id(request.task_id)
        if not request.idempotency_key:
            raise InvalidArgument("idempotency_key", "must not be empty")
        key = validation.text(
            "idempotency_key", request.idempotency_key, self.limits.idempotency_key_length
        )
        released = await self.engine.reset_idempotency_key(principal().environment_id, task, key)
        return rpb.ResetIdempotencyKeyResponse(released=released)

    async def UpdateRunMetadata(
        self, request: rpb.UpdateRunMetadataRequest, context: Context
    ) -> rpb.UpdateRunMetadataResponse:
        run_id = validation.run_id(request.run_id)
        metadata = validation.metadata_object("metadata", request.metadata, self.limits)
        row = await self.engine.update_metadata(principal().environment_id, run_id, metadata)
        return rpb.UpdateRunMetadataResponse(run=run_to_pb(row))

    async def AddRunTags(
        self, request: rpb.AddRunTagsRequest, context: Context
    ) -> rpb.AddRunTagsResponse:
        run_id = validation.run_id(request.run_id)
        tags = validation.tags_to_add(list(request.tags), self.limits)
        row = await self.engine.add_tags(principal().environment_id, run_id, tags)
        return rpb.AddRunTagsResponse(run=run_to_pb(row))

    async def ListRunLogs(
        self, request: rpb.ListRunLogsRequest, context: Context
    ) -> rpb.ListRunLogsResponse:
        run_id = validation.run_id(request.run_id)
        size = validation.log_page_size(request.page_size)
        filters = validation.page_filters(request)
        after = validation.decode_page_token(request.page_token, validation.LOG_ID, filters)
        env = principal().environment_id
        # Logs are stored by the run id the executor reported; the run itself must be the
        # caller's, as for GetRun.
        if await self.engine.store.get_run(env, run_id) is None:
            raise NotFound(f"run {run_id} not found")
        rows = await self.engine.list_logs(env, run_id, after, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        response = rpb.ListRunLogsResponse(
            next_page_token=validation.encode_page_token(rows[-1].id, filters) if more else ""
        )
        for row in rows:
            entry = response.entries.add(
                run_id=row.run_id,
                attempt_id=row.attempt_id,
                attempt_number=row.attempt_number,
                level=row.level,
                message=row.message,
                attributes=row.attributes,
                trace_id=row.trace_id,
                span_id=row.span_id,
            )
            entry.time.FromMilliseconds(row.time)
        return response

    async def GetRunTimeline(
        self, request: rpb.GetRunTimelineRequest, context: Context
    ) -> rpb.GetRunTimelineResponse:
        run_id = validation.run_id(request.run_id)
        env = principal().environment_id
        row = await self.engine.store.get_run(env, run_id)
        if row is None:
            raise NotFound(f"run {run_id} not found")
        rows = await self.engine.timeline(env, run_id, TIMELINE_LOG_LINES + 1)
        response = rpb.GetRunTimelineResponse(
            run=run_to_pb(row),
            logs_truncated=len(rows.logs) > TIMELINE_LOG_LINES,
            queue_intervals=queue_intervals(row, rows.attempts),
        )
        for attempt in rows.attempts:
            response.attempts.add(
                id=attempt.id,
                number=attempt.number,
                status=attempt.status,
                created_at=timestamp(attempt.created_at),
                started_at=timestamp(attempt.started_at),
                finished_at=timestamp(attempt.finished_at),
                error=_attempt_error(attempt.error),
            )
        for wait in rows.waits:
            response.waits.add(
                id=wait.id,
                kind=wait.kind,
                status=wait.status,
                attempt_number=wait.attempt or 0,
                started_at=timestamp(wait.created_at),
                finished_at=timestamp(wait.completed_at),
                target=wait.target or "",
                due_at=timestamp(wait.due_at),
                child_run_ids=rows.wait_children.get(wait.id, []),
            )
        response.children.extend(run_to_pb(child) for child in rows.children)
        for log_row in rows.logs[:TIMELINE_LOG_LINES]:
            entry = response.logs.add(
                run_id=log_row.run_id,
                attempt_id=log_row.attempt_id,
                attempt_number=log_row.attempt_number,
                level=log_row.level,
                message=log_row.message,
                attributes=log_row.attributes,
                trace_id=log_row.trace_id,
                span_id=log_row.span_id,
            )
            entry.time.FromMilliseconds(log_row.time)
        return response


# The log lines a timeline carries; the rest are ListRunLogs' to page through.
TIMELINE_LOG_LINES = 1000


def _attempt_error(text: str | None) -> run_pb2.RunError | None:
    if not text:
        return None
    try:
        e = orjson.loads(text)
    except orjson.JSONDecodeError:
        return run_pb2.RunError(message=text)
    if not isinstance(e, dict):
        return run_pb2.RunError(message=str(e))
    return run_pb2.RunError(
        type=str(e.get("type", "")),
        message=str(e.get("message", "")),
        stack_trace=str(e.get("stack_trace", "")),
    )


def queue_intervals(run: RunRow, attempts: Sequence[RunRow]) -> list[rpb.TimelineInterval]:
    """When the run waited for an attempt: DELAYED from its creation to its delay's end, then
    QUEUED until its first attempt was dequeued, and between each attempt's end and the next
    one's dequeue (a retry's delay and its time in the queue). The last one is open (no end)
    while the run is still delayed or queued."""
    intervals: list[rpb.TimelineInterval] = []
    queued_from = run.queued_at or run.created_at
    if run.delay_until is not None and run.queued_at is not None and run.queued_at > run.created_at:
        intervals.append(
            rpb.TimelineInterval(
                kind="DELAYED",
                started_at=timestamp(run.created_at),
                finished_at=timestamp(run.queued_at),
            )
        )
    for attempt in attempts:
        if queued_from is not None and attempt.created_at >= queued_from:
            intervals.append(
                rpb.TimelineInterval(
                    kind="QUEUED",
                    started_at=timestamp(queued_from),
                    finished_at=timestamp(attempt.created_at),
                )
            )
        queued_from = attempt.finished_at
    if queued_from is not None and run.status in _QUEUED_NOW:
        intervals.append(rpb.TimelineInterval(kind="QUEUED", started_at=timestamp(queued_from)))
    elif run.status == Status.DELAYED.value and not attempts:
        intervals.append(rpb.TimelineInterval(kind="DELAYED", started_at=timestamp(run.created_at)))
    return intervals


_QUEUED_NOW = frozenset({Status.QUEUED.value, Status.PENDING_VERSION.value})
