"""Cron schedules: the runner that fires their ticks, the sync of declarative schedules when an
executor registers, and the gRPC ScheduleService.

A tick fires exactly once. Each schedule row holds its next nominal tick (``next_run_at``) and the
last one that fired: the row is the schedule's durable timer, so a restart loses no tick. Firing
triggers the run through :meth:`RunEngine.trigger` with an idempotency key made of the schedule
id and the nominal time, then advances the row; a crash between the two re-fires the same tick
after the restart, and the key returns the run already made. Ticks missed while the scheduler
was down collapse into one catch-up run for the latest of them (its ``last_timestamp`` is the
last tick that did fire), never a burst.

Times here are on the schedule :class:`Clock`: the real clock in production; tests may run it
faster (``RUNPLANE_SCHEDULE_CLOCK_SPEED``) so a minutely cron ticks every second, with the same
code path.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import re
import time
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any, Protocol, TypeAlias

import grpc
import orjson
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import context as otel_context

from runplane.v1 import schedule_service_pb2 as spb
from runplane.v1 import schedule_service_pb2_grpc
from runplane_common import telemetry
from runplane_common.auth import principal
from runplane_common.config import SchedulerSettings
from runplane_common.errors import FailedPrecondition, InvalidArgument, NotFound
from runplane_common.ids import new_id
from runplane_core import cron
from runplane_scheduler import validation
from runplane_scheduler.engine import RunEngine
from runplane_scheduler.specs import TriggerSpec
from runplane_scheduler.store import RunRow, Tx, now_ms
from runplane_scheduler.store import schedules as stored
from runplane_scheduler.worker_messages import Registration

log = logging.getLogger("runplane.scheduler.schedules")

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

DECLARATIVE = "DECLARATIVE"
IMPERATIVE = "IMPERATIVE"
UPCOMING = 5
SCHEDULE_ID = re.compile(r"^sched_[0-9a-z]{1,36}\Z")
TEXT_LIMIT = 256


class Clock(Protocol):
    """The time schedules run on."""

    def now_ms(self) -> int: ...

    def real_seconds(self, span_ms: int) -> float:
        """How long in real time ``span_ms`` of this clock's time lasts."""
        ...


@dataclass(frozen=True)
class ScaledClock:
    """Real time, sped up ``speed`` times from ``epoch_ms`` on (speed 1: the real clock). Anchored
    at a fixed epoch, so every scheduler process started with the same settings shows the same
    time, and a restart neither rewinds it nor skips ahead."""

    speed: float = 1.0
    epoch_ms: int = 0

    @classmethod
    def from_settings(cls, settings: SchedulerSettings) -> ScaledClock:
        return cls(settings.schedule_clock_speed, settings.schedule_clock_epoch_ms)

    def now_ms(self) -> int:
        real = time.time_ns() // 1_000_000
        return int(self.epoch_ms + (real - self.epoch_ms) * self.speed)

    def real_seconds(self, span_ms: int) -> float:
        return span_ms / 1000 / self.speed


# -- checks and shapes ----------------------------------------------------------------------------


@cache
def timezones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones() | {"UTC"})


def check_timezone(field: str, value: str) -> str:
    value = value or "UTC"
    if value not in timezones():
        raise InvalidArgument(field, f"{value[:80]!r} is not an IANA time zone (see ListTimezones)")
    return value


def check_cron(field: str, value: str) -> cron.Cron:
    validation.text(field, value, TEXT_LIMIT)
    try:
        return cron.parse(value)
    except cron.CronError as error:
        raise InvalidArgument(field, str(error)) from None


def check_schedule_id(value: str) -> str:
    if not SCHEDULE_ID.match(value):
        raise InvalidArgument("schedule_id", f"{value[:80]!r} is not a schedule id (sched_...)")
    return value


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _iso(ms: int) -> str:
    return _dt(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def next_tick(expression: str, timezone: str, after_ms: int) -> int:
    """The first tick of a (valid) schedule strictly after ``after_ms``."""
    return _ms(cron.next_after(cron.parse(expression), _dt(after_ms), zoneinfo.ZoneInfo(timezone)))


def scheduled_payload(row: RunRow, tick_ms: int) -> str:
    """The payload of the run for nominal tick ``tick_ms`` (SDK: ``runplane.ScheduledPayload``)."""
    m = row._mapping
    tz = zoneinfo.ZoneInfo(m["timezone"])
    upcoming = cron.upcoming(cron.parse(m["cron"]), _dt(tick_ms), tz, UPCOMING)
    return orjson.dumps(
        {
            "schedule_id": m["id"],
            "type": m["type"],
            "timestamp": _iso(tick_ms),
            "last_timestamp": _iso(m["last_run_at"]) if m["last_run_at"] is not None else None,
            "external_id": m["external_id"],
            "timezone": m["timezone"],
            "upcoming": [_iso(_ms(t)) for t in upcoming],
        }
    ).decode()


def _ts(ms: int | None) -> Timestamp | None:
    if ms is None:
        return None
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def schedule_to_pb(row: RunRow) -> spb.Schedule:
    m = row._mapping
    return spb.Schedule(
        id=m["id"],
        type=spb.ScheduleType.Value("SCHEDULE_TYPE_" + m["type"]),
        task_id=m["task_id"],
        active=m["active"],
        cron=m["cron"],
        timezone=m["timezone"],
        external_id=m["external_id"] or "",
        deduplication_key=m["deduplication_key"] or "",
        next_run=_ts(m["next_run_at"]),
        last_run=_ts(m["last_run_at"]),
        created_at=_ts(m["created_at"]),
        updated_at=_ts(m["updated_at"]),
        environment_id=m["environment_id"],
    )


# -- the runner -----------------------------------------------------------------------------------


class ScheduleRunner:
    """Fires due ticks of active schedules: an in-memory heap of next ticks over the rows."""

    def __init__(self, engine: RunEngine, clock: Clock) -> None:
        self.engine = engine
        self.clock = clock
        self._heap: list[tuple[int, str]] = []
        # The tick each schedule is due at; heap entries that disagree are stale.
        self._due: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._retries: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self) -> None:
        for row in await stored.load_active(self.engine.store.db):
            m = row._mapping
            if m["next_run_at"] is not None:
                self.due(m["id"], m["next_run_at"])
        self._task = asyncio.create_task(self._loop(), name="schedules")

    async def stop(self) -> None:
        """Let a tick being fired finish (its run and the row's advance go together), then
        end; cancel only if that takes too long."""
        self._stopping = True
        self._wake.set()
        tasks = [t for t in [self._task, *self._retries] if t is not None]
        for task in self._retries:
            task.cancel()
        if self._task is not None:
            _, pending = await asyncio.wait({self._task}, timeout=5.0)
            for task in pending:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def due(self, schedule_id: str, tick_ms: int | None) -> None:
        """Fire ``schedule_id`` at ``tick_ms`` (None: not at all)."""
        if tick_ms is None:
            self._due.pop(schedule_id, None)
            return
        self._due[schedule_id] = tick_ms
        heapq.heappush(self._heap, (tick_ms, schedule_id))
        self._wake.set()

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            if not self._heap:
                await self._wake.wait()
                continue
            tick, schedule_id = self._heap[0]
            if self._due.get(schedule_id) != tick:
                heapq.heappop(self._heap)
                continue
            wait_ms = tick - self.clock.now_ms()
            if wait_ms > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wake.wait(), timeout=self.clock.real_seconds(wait_ms)
                    )
                continue
            heapq.heappop(self._heap)
            del self._due[schedule_id]
            try:
                await self._fire(schedule_id)
            except Exception:
                log.exception("schedule %s failed to fire; retrying in 1 s", schedule_id)
                self._retry(schedule_id, tick)

    def _retry(self, schedule_id: str, tick: int) -> None:
        async def later() -> None:
            await asyncio.sleep(1.0)
            if schedule_id not in self._due:
                self.due(schedule_id, tick)

        task = asyncio.create_task(later())
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _fire(self, schedule_id: str) -> None:
        row = await stored.find(self.engine.store.db, schedule_id)
        if row is None or not row.active or row.next_run_at is None:
            return
        m = row._mapping
        now = self.clock.now_ms()
        if m["next_run_at"] > now:  # changed since it was queued
            self.due(schedule_id, m["next_run_at"])
            return
        expression = cron.parse(m["cron"])
        tz = zoneinfo.ZoneInfo(m["timezone"])
        # Missed ticks collapse into the latest one: one catch-up run, not a burst.
        latest = cron.latest_between(expression, _dt(m["next_run_at"] - 1), _dt(now), tz)
        tick = _ms(latest) if latest is not None else m["next_run_at"]
        spec = TriggerSpec(
            task_id=m["task_id"],
            payload=scheduled_payload(row, tick),
            queue="",
            tags=(),
            metadata="{}",
            max_attempts=0,
            idempotency_key=f"schedule:{schedule_id}:{tick}",
            schedule_tick=f"{schedule_id}:{tick}",
            concurrency_key="",
            priority=0,
        )
        # Each tick's run starts a trace of its own (a new root): nothing that ran before caused
        # it, and a trace as long as the schedule would never end.
        with telemetry.tracer().start_as_current_span(
            f"schedule {schedule_id}",
            context=otel_context.Context(),
            attributes={
                "runplane.schedule_id": schedule_id,
                "runplane.task_id": m["task_id"],
                "runplane.schedule_tick": _iso(tick),
            },
        ):
            handle, cached = await self.engine.trigger(m["environment_id"], spec)
        following = _ms(cron.next_after(expression, _dt(now), tz))

        async def advance(tx: Tx) -> RunRow | None:
            return await stored.advance(
                tx, schedule_id, m["next_run_at"], next_run_at=following, last_run_at=tick
            )

        if await self.engine.store.writer.run(advance) is not None:
            self.due(schedule_id, following)
        run_id = handle["id"]
        log.info(
            "schedule %s fired for %s: run %s%s",
            schedule_id,
            _iso(tick),
            run_id,
            " (already made)" if cached else "",
        )

    # -- declarative schedules --------------------------------------------------------------------

    async def sync_declarative(
        self, environment_id: str, register: Registration, executor_id: str
    ) -> None:
        """Make the environment's declarative schedules match a registering executor's manifest:
        create or update those it declares, deactivate those of its tasks that no longer declare
        one, and those of tasks no connected executor provides any more (removed from the code).
        Raises InvalidArgument, having written nothing, when a declared schedule is bad."""
        declared: dict[str, tuple[str, str]] = {}
        for i, t in enumerate(register.manifest):
            if t.cron:
                where = f"register.manifest.tasks[{i}].schedule"
                expression = check_cron(f"{where}.cron", t.cron).expression
                declared[t.definition.task_id] = (
                    expression,
                    check_timezone(f"{where}.timezone", t.timezone),
                )
        in_manifest = {t.definition.task_id for t in register.manifest}
        index = self.engine.index

        def provided_elsewhere(task_id: str) -> bool:
            return any(
                ex.connected
                and ex.environment_id == environment_id
                and ex.executor_id != executor_id
                and task_id in ex.tasks
                for ex in index.executors.values()
            )

        async def op(tx: Tx) -> None:
            rows = await stored.of_type(tx, environment_id, DECLARATIVE)
            existing = {r._mapping["task_id"]: r._mapping for r in rows}
            now = self.clock.now_ms()
            changed: list[tuple[str, int | None]] = []
            for task_id, (expression, timezone) in declared.items():
                old = existing.get(task_id)
                following = next_tick(expression, timezone, now)
                if old is None:
                    schedule_id = new_id("sched")
                    ts = now_ms()
                    await stored.insert_schedule(
                        tx,
                        {
                            "id": schedule_id,
                            "environment_id": environment_id,
                            "type": DECLARATIVE,
                            "task_id": task_id,
                            "cron": expression,
                            "timezone": timezone,
                            "external_id": None,
                            "deduplication_key": None,
                            "active": True,
                            "next_run_at": following,
                            "last_run_at": None,
                            "created_at": ts,
                            "updated_at": ts,
                        },
                    )
                    changed.append((schedule_id, following))
                elif (old["cron"], old["timezone"], old["active"]) != (expression, timezone, True):
                    await stored.change(
                        tx,
                        old["id"],
                        cron=expression,
                        timezone=timezone,
                        active=True,
                        next_run_at=following,
                    )
                    changed.append((old["id"], following))
            for task_id, old in existing.items():
                if task_id in declared or not old["active"]:
                    continue
                if task_id in in_manifest or not provided_elsewhere(task_id):
                    await stored.change(tx, old["id"], active=False, next_run_at=None)
                    changed.append((old["id"], None))
                    log.info("declarative schedule %s of %s deactivated", old["id"], task_id)

            def queue_ticks() -> None:
                for schedule_id, tick in changed:
                    self.due(schedule_id, tick)

            tx.after_commit.append(queue_ticks)

        await self.engine.store.writer.run(op)


# -- the service ----------------------------------------------------------------------------------


class ScheduleServicer(schedule_service_pb2_grpc.ScheduleServiceServicer):
    def __init__(self, runner: ScheduleRunner, settings: SchedulerSettings) -> None:
        self.runner = runner
        self.engine = runner.engine
        self.limits = settings.limits

    def _known_task(self, environment_id: str, value: str) -> str:
        task_id = validation.task_id(value)
        if (environment_id, task_id) not in self.engine.task_defs:
            raise InvalidArgument(
                "task_id",
                f"no task {task_id!r} in this environment (an executor providing it must have "
                "registered)",
            )
        return task_id

    async def _write(self, op: Any) -> RunRow:
        """Run ``op`` (returning the schedule row) and re-queue the schedule's next tick."""
        row: RunRow = await self.engine.store.writer.run(op)
        m = row._mapping
        self.runner.due(m["id"], m["next_run_at"] if m["active"] else None)
        return row

    async def CreateSchedule(
        self, request: spb.CreateScheduleRequest, context: Context
    ) -> spb.CreateScheduleResponse:
        env = principal().environment_id
        task_id = self._known_task(env, request.task_id)
        expression = check_cron("cron", request.cron).expression
        timezone = check_timezone("timezone", request.timezone)
        external_id = validation.text("external_id", request.external_id, TEXT_LIMIT) or None
        dedup = validation.text("deduplication_key", request.deduplication_key, TEXT_LIMIT) or None
        created = True

        async def op(tx: Tx) -> RunRow:
            nonlocal created
            now = self.runner.clock.now_ms()
            if dedup is not None:
                old = await stored.by_deduplication_key(tx, env, dedup)
                if old is not None:
                    created = False
                    active = old._mapping["active"]
                    row = await stored.change(
                        tx,
                        old._mapping["id"],
                        task_id=task_id,
                        cron=expression,
                        timezone=timezone,
                        external_id=external_id,
                        next_run_at=next_tick(expression, timezone, now) if active else None,
                    )
                    assert row is not None
                    return row
            ts = now_ms()
            schedule_id = new_id("sched")
            values = {
                "id": schedule_id,
                "environment_id": env,
                "type": IMPERATIVE,
                "task_id": task_id,
                "cron": expression,
                "timezone": timezone,
                "external_id": external_id,
                "deduplication_key": dedup,
                "active": True,
                "next_run_at": next_tick(expression, timezone, now),
                "last_run_at": None,
                "created_at": ts,
                "updated_at": ts,
            }
            await stored.insert_schedule(tx, values)
            return await stored.get(tx, env, schedule_id)

        row = await self._write(op)
        return spb.CreateScheduleResponse(schedule=schedule_to_pb(row), created=created)

    async def GetSchedule(
        self, request: spb.GetScheduleRequest, context: Context
    ) -> spb.GetScheduleResponse:
        schedule_id = check_schedule_id(request.schedule_id)
        env = principal().environment_id
        row = await stored.find_in(self.engine.store.db, env, schedule_id)
        if row is None:
            raise NotFound(f"schedule {schedule_id} not found")
        return spb.GetScheduleResponse(schedule=schedule_to_pb(row))

    async def ListSchedules(
        self, request: spb.ListSchedulesRequest, context: Context
    ) -> spb.ListSchedulesResponse:
        size = validation.page_size(request.page_size, self.limits.page_size)
        task_ids = [validation.task_id(t, f"task_ids[{i}]") for i, t in enumerate(request.task_ids)]
        filters = validation.page_filters(request)
        after = validation.decode_page_token(request.page_token, SCHEDULE_ID, filters)
        rows = await stored.list_in(
            self.engine.store.db, principal().environment_id, task_ids, after, size + 1
        )
        more = len(rows) > size
        rows = rows[:size]
        return spb.ListSchedulesResponse(
            schedules=[schedule_to_pb(r) for r in rows],
            next_page_token=validation.encode_page_token(rows[-1].id, filters) if more else "",
        )

    async def _change(self, schedule_id: str, change: Any) -> RunRow:
        """Apply ``change(tx, row)`` to an imperative schedule of the caller's environment."""
        env = principal().environment_id

        async def op(tx: Tx) -> RunRow:
            row = await stored.get(tx, env, schedule_id)
            if row._mapping["type"] == DECLARATIVE:
                raise FailedPrecondition(
                    f"schedule {schedule_id} is declarative: change it in the task's code"
                )
            result: RunRow = await change(tx, row)
            return result

        return await self._write(op)

    async def UpdateSchedule(
        self, request: spb.UpdateScheduleRequest, context: Context
    ) -> spb.UpdateScheduleResponse:
        schedule_id = check_schedule_id(request.schedule_id)
        env = principal().environment_id
        values: dict[str, Any] = {}
        if request.task_id:
            values["task_id"] = self._known_task(env, request.task_id)
        if request.cron:
            values["cron"] = check_cron("cron", request.cron).expression
        if request.timezone:
            values["timezone"] = check_timezone("timezone", request.timezone)
        if request.HasField("external_id"):
            text = validation.text("external_id", request.external_id, TEXT_LIMIT)
            values["external_id"] = text or None

        async def change(tx: Tx, row: RunRow) -> RunRow:
            m = row._mapping
            if m["active"] and ("cron" in values or "timezone" in values):
                values["next_run_at"] = next_tick(
                    values.get("cron", m["cron"]),
                    values.get("timezone", m["timezone"]),
                    self.runner.clock.now_ms(),
                )
            updated = await stored.change(tx, schedule_id, **values)
            assert updated is not None
            return updated

        row = await self._change(schedule_id, change)
        return spb.UpdateScheduleResponse(schedule=schedule_to_pb(row))

    async def DeleteSchedule(
        self, request: spb.DeleteScheduleRequest, context: Context
    ) -> spb.DeleteScheduleResponse:
        schedule_id = check_schedule_id(request.schedule_id)

        async def change(tx: Tx, row: RunRow) -> RunRow:
            await stored.delete_schedule(tx, schedule_id)
            return row

        row = await self._change(schedule_id, change)
        self.runner.due(schedule_id, None)
        gone = schedule_to_pb(row)
        gone.active = False
        gone.ClearField("next_run")
        return spb.DeleteScheduleResponse(schedule=gone)

    async def _set_active(self, schedule_id: str, active: bool) -> RunRow:
        async def change(tx: Tx, row: RunRow) -> RunRow:
            m = row._mapping
            if m["active"] == active:
                return row
            following = (
                next_tick(m["cron"], m["timezone"], self.runner.clock.now_ms()) if active else None
            )
            updated = await stored.change(tx, schedule_id, active=active, next_run_at=following)
            assert updated is not None
            return updated

        return await self._change(schedule_id, change)

    async def ActivateSchedule(
        self, request: spb.ActivateScheduleRequest, context: Context
    ) -> spb.ActivateScheduleResponse:
        row = await self._set_active(check_schedule_id(request.schedule_id), True)
        return spb.ActivateScheduleResponse(schedule=schedule_to_pb(row))

    async def DeactivateSchedule(
        self, request: spb.DeactivateScheduleRequest, context: Context
    ) -> spb.DeactivateScheduleResponse:
        row = await self._set_active(check_schedule_id(request.schedule_id), False)
        return spb.DeactivateScheduleResponse(schedule=schedule_to_pb(row))

    async def ListTimezones(
        self, request: spb.ListTimezonesRequest, context: Context
    ) -> spb.ListTimezonesResponse:
        names = sorted(timezones() - ({"UTC"} if request.exclude_utc else set()))
        return spb.ListTimezonesResponse(timezones=names)
