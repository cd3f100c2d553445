"""A scheduler in this process (real gRPC on a free port, real NATS, SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from runplane_common.config import SchedulerSettings
from runplane_scheduler.app import Scheduler, start_scheduler


@pytest.fixture
async def scheduler(database_url: str, nats_server: Any) -> AsyncIterator[Scheduler]:
    s = await start_scheduler(
        SchedulerSettings(database_url=database_url, nats_url=nats_server.url, listen="127.0.0.1:0")
    )
    yield s
    await s.stop()
