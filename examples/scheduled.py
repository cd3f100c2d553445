"""Scheduled tasks: ``runplane dev --tasks examples.scheduled``.

Declarative schedules live with their task and sync when the executor registers; imperative ones
are made at runtime, e.g. one reminder schedule per user:

    await schedules.create(task="user-reminder", cron="0 8 * * *", timezone="Europe/London",
                           external_id="user-42", deduplication_key="user-42-reminder")
"""

from __future__ import annotations

from runplane import Context, ScheduledPayload, schedules


@schedules.task(id="minutely-report", cron="* * * * *")
async def minutely_report(payload: ScheduledPayload, ctx: Context) -> dict[str, object]:
    """Runs every minute; reports which tick it is for."""
    return {
        "schedule_id": payload.schedule_id,
        "type": payload.type,
        "timestamp": payload.timestamp.isoformat(),
        "last_timestamp": payload.last_timestamp.isoformat() if payload.last_timestamp else None,
        "upcoming": [t.isoformat() for t in payload.upcoming],
        "run": ctx.run.id,
    }


@schedules.task(id="weekday-digest", cron="0 9 * * 1-5", timezone="Europe/London")
async def weekday_digest(payload: ScheduledPayload) -> str:
    """09:00 London time on weekdays, GMT or BST alike."""
    return f"digest for {payload.timestamp.date()}"


@schedules.task(id="user-reminder")
async def user_reminder(payload: ScheduledPayload) -> str:
    """No cron of its own: imperative schedules (one per user) trigger it."""
    return f"reminding {payload.external_id} at {payload.timestamp.isoformat()}"
