"""Version 2 of ``tests.e2e.version_tasks``: the same tasks, and a declarative schedule that
version 1 does not have."""

from __future__ import annotations

from typing import Any

from runplane import schedules
from tests.e2e.version_tasks import version_echo, version_waiter

__all__ = ["nightly_report", "version_echo", "version_waiter"]


@schedules.task(id="version-nightly", cron="0 3 * * *")
async def nightly_report(payload: Any) -> str:
    return "report"
