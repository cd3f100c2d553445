"""Cron schedules: ``@schedules.task`` (declarative) and the ``schedules`` API (imperative).

    @schedules.task(id="daily-report", cron="0 9 * * 1-5", timezone="Europe/London")
    async def daily_report(payload: ScheduledPayload, ctx: Context) -> None: ...

    await schedules.create(task="daily-report", cron="0 * * * *", deduplication_key="hourly")

A declarative schedule lives in the task's code: executors send it with their manifest, and it
changes (or is deactivated, once removed) only there. Imperative schedules are made through the
API; creating one with a ``deduplication_key`` that already names a schedule updates that one.
"""

from __future__ import annotations

import builtins
import zoneinfo
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel

from runplane._errors import ConfigurationError
from runplane._namespace import Namespace
from runplane._task import Queue, RetryOptions, TaskDecorator, task
from runplane.v1 import schedule_service_pb2 as spb
from runplane.v1 import schedule_service_pb2_grpc
from runplane_core.cron import CronError, parse


class ScheduledPayload(BaseModel):
    """What a scheduled run receives: annotate the task's payload parameter with it."""

    schedule_id: str
    type: Literal["DECLARATIVE", "IMPERATIVE"]
    # The tick's nominal time (not when the run started).
    timestamp: datetime
    # The previous tick that triggered a run, if any.
    last_timestamp: datetime | None = None
    external_id: str | None = None
    timezone: str = "UTC"
    # The next 5 ticks after this one.
    upcoming: list[datetime] = []


def _dt(ts: Any, present: bool) -> datetime | None:
    return datetime.fromtimestamp(ts.ToMilliseconds() / 1000, tz=UTC) if present else None


@dataclass(frozen=True)
class Schedule:
    """A schedule as the API shows it."""

    id: str
    type: Literal["DECLARATIVE", "IMPERATIVE"]
    task_id: str
    active: bool
    cron: str
    timezone: str
    external_id: str | None
    deduplication_key: str | None
    next_run: datetime | None
    last_run: datetime | None
    created_at: datetime | None
    updated_at: datetime | None
    raw: spb.Schedule = field(repr=False, compare=False)

    @classmethod
    def from_pb(cls, pb: spb.Schedule) -> Schedule:
        kind = spb.ScheduleType.Name(pb.type).removeprefix("SCHEDULE_TYPE_")
        return cls(
            id=pb.id,
            type="DECLARATIVE" if kind == "DECLARATIVE" else "IMPERATIVE",
            task_id=pb.task_id,
            active=pb.active,
            cron=pb.cron,
            timezone=pb.timezone,
            external_id=pb.external_id or None,
            deduplication_key=pb.deduplication_key or None,
            next_run=_dt(pb.next_run, pb.HasField("next_run")),
            last_run=_dt(pb.last_run, pb.HasField("last_run")),
            created_at=_dt(pb.created_at, pb.HasField("created_at")),
            updated_at=_dt(pb.updated_at, pb.HasField("updated_at")),
            raw=pb,
        )


@dataclass(frozen=True)
class DeclaredSchedule:
    cron: str
    timezone: str


_DECLARED: dict[str, DeclaredSchedule] = {}


def declared_schedules() -> dict[str, DeclaredSchedule]:
    """The schedules declared with ``@schedules.task`` in this process, by task id."""
    return dict(_DECLARED)


def _check_declared(task_id: str, cron: str, timezone: str) -> None:
    try:
        parse(cron)
    except CronError as error:
        raise ConfigurationError(f"task {task_id!r}: bad cron: {error}") from None
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(
            f"task {task_id!r}: {timezone!r} is not an IANA time zone"
        ) from None


def _schedule_id(schedule: str | Schedule) -> str:
    return schedule.id if isinstance(schedule, Schedule) else schedule


class SchedulesAPI(Namespace):
    """Declare scheduled tasks and manage schedules."""

    @staticmethod
    def task(
        *,
        id: str,
        cron: str | None = None,
        timezone: str = "UTC",
        queue: Queue | str | None = None,
        retry: RetryOptions | dict[str, Any] | None = None,
        machine: str = "small-1x",
        max_duration: float = 0,
        description: str = "",
    ) -> TaskDecorator:
        """A task whose payload is a :class:`ScheduledPayload`. With ``cron`` (five fields, read
        in the IANA ``timezone``), it carries a declarative schedule; without, it is a target
        for imperative schedules."""
        if cron is not None:
            _check_declared(id, cron, timezone)
            _DECLARED[id] = DeclaredSchedule(cron=cron, timezone=timezone)
        else:
            _DECLARED.pop(id, None)
        return task(
            id=id,
            queue=queue,
            retry=retry,
            machine=machine,
            max_duration=max_duration,
            description=description,
        )

    def _stub(self) -> schedule_service_pb2_grpc.ScheduleServiceStub:
        return schedule_service_pb2_grpc.ScheduleServiceStub(self._transport.channel())

    async def _one(self, method: str, request: Any) -> Schedule:
        response = await self._transport.call(getattr(self._stub(), method), request)
        return Schedule.from_pb(response.schedule)

    async def create(
        self,
        *,
        task: str,
        cron: str,
        timezone: str = "UTC",
        external_id: str | None = None,
        deduplication_key: str | None = None,
    ) -> Schedule:
        """Create an imperative schedule, or update the one ``deduplication_key`` names."""
        return await self._one(
            "CreateSchedule",
            spb.CreateScheduleRequest(
                task_id=task,
                cron=cron,
                timezone=timezone,
                external_id=external_id or "",
                deduplication_key=deduplication_key or "",
            ),
        )

    def create_sync(self, **options: Any) -> Schedule:
        return self._transport.run_sync(self.create(**options))

    async def retrieve(self, schedule: str | Schedule) -> Schedule:
        return await self._one(
            "GetSchedule", spb.GetScheduleRequest(schedule_id=_schedule_id(schedule))
        )

    def retrieve_sync(self, schedule: str | Schedule) -> Schedule:
        return self._transport.run_sync(self.retrieve(schedule))

    async def list(
        self,
        *,
        task: str | Sequence[str] | None = None,
        limit: int | None = None,
        page_size: int = 25,
    ) -> AsyncIterator[Schedule]:
        """Schedules, oldest first, fetched a page at a time; stops after ``limit``."""
        request = spb.ListSchedulesRequest(
            task_ids=[task] if isinstance(task, str) else list(task or []), page_size=page_size
        )
        async for pb in self._transport.paged(
            self._stub().ListSchedules, request, "schedules", limit
        ):
            yield Schedule.from_pb(pb)

    def list_sync(self, **filters: Any) -> Iterator[Schedule]:
        return self._transport.iterate_sync(self.list(**filters))

    async def update(
        self,
        schedule: str | Schedule,
        *,
        task: str | None = None,
        cron: str | None = None,
        timezone: str | None = None,
        external_id: str | None = None,
    ) -> Schedule:
        """Change an imperative schedule; arguments left out keep their value."""
        request = spb.UpdateScheduleRequest(
            schedule_id=_schedule_id(schedule),
            task_id=task or "",
            cron=cron or "",
            timezone=timezone or "",
        )
        if external_id is not None:
            request.external_id = external_id
        return await self._one("UpdateSchedule", request)

    def update_sync(self, schedule: str | Schedule, **changes: Any) -> Schedule:
        return self._transport.run_sync(self.update(schedule, **changes))

    async def delete(self, schedule: str | Schedule) -> Schedule:
        return await self._one(
            "DeleteSchedule", spb.DeleteScheduleRequest(schedule_id=_schedule_id(schedule))
        )

    def delete_sync(self, schedule: str | Schedule) -> Schedule:
        return self._transport.run_sync(self.delete(schedule))

    async def activate(self, schedule: str | Schedule) -> Schedule:
        return await self._one(
            "ActivateSchedule", spb.ActivateScheduleRequest(schedule_id=_schedule_id(schedule))
        )

    def activate_sync(self, schedule: str | Schedule) -> Schedule:
        return self._transport.run_sync(self.activate(schedule))

    async def deactivate(self, schedule: str | Schedule) -> Schedule:
        return await self._one(
            "DeactivateSchedule",
            spb.DeactivateScheduleRequest(schedule_id=_schedule_id(schedule)),
        )

    def deactivate_sync(self, schedule: str | Schedule) -> Schedule:
        return self._transport.run_sync(self.deactivate(schedule))

    async def timezones(self, *, exclude_utc: bool = False) -> builtins.list[str]:
        """The IANA time zone names a schedule may use."""
        transport = self._transport
        response = await transport.call(
            self._stub().ListTimezones, spb.ListTimezonesRequest(exclude_utc=exclude_utc)
        )
        return list(response.timezones)

    def timezones_sync(self, *, exclude_utc: bool = False) -> builtins.list[str]:
        return self._transport.run_sync(self.timezones(exclude_utc=exclude_utc))


schedules = SchedulesAPI(None)
