"""Every service can be discovered through server reflection (what `buf curl --list-methods` or
grpcurl use), with each of its methods."""

from __future__ import annotations

import asyncio
from typing import Any

from runplane.v1 import (
    auth_service_pb2,
    meta_service_pb2,
    realtime_service_pb2,
    run_service_pb2,
    worker_service_pb2,
)
from runplane_common.config import RealtimeSettings, SchedulerSettings
from runplane_realtime.server import serve
from runplane_scheduler.app import start_scheduler
from tests.helpers.reflection import list_services


def _methods(module: Any, service: str) -> list[str]:
    return [m.name for m in module.DESCRIPTOR.services_by_name[service].methods]


async def test_every_service_lists_its_methods_through_reflection(
    migrated_database_url: str, nats_server: Any
) -> None:
    scheduler = await start_scheduler(
        SchedulerSettings(
            database_url=migrated_database_url, nats_url=nats_server.url, listen="127.0.0.1:0"
        )
    )
    realtime = await serve(
        RealtimeSettings(
            nats_url=nats_server.url,
            api_url=f"127.0.0.1:{scheduler.port}",
            listen="127.0.0.1:0",
        )
    )
    try:
        on_scheduler = await asyncio.to_thread(list_services, f"127.0.0.1:{scheduler.port}")
        on_realtime = await asyncio.to_thread(list_services, f"127.0.0.1:{realtime.port}")
    finally:
        await realtime.stop(grace=0)
        await scheduler.stop()

    assert on_scheduler["runplane.v1.RunService"] == _methods(run_service_pb2, "RunService")
    assert on_scheduler["runplane.v1.WorkerService"] == _methods(
        worker_service_pb2, "WorkerService"
    )
    assert on_scheduler["runplane.v1.MetaService"] == _methods(meta_service_pb2, "MetaService")
    assert on_scheduler["runplane.v1.AuthService"] == ["CreatePublicToken"]
    assert on_scheduler["runplane.v1.AuthService"] == _methods(auth_service_pb2, "AuthService")
    assert on_realtime["runplane.v1.RealtimeService"] == [
        "SubscribeToRun",
        "SubscribeToRunsWithTag",
        "SubscribeToBatch",
        "ReadStream",
        "AppendStream",
    ]
    assert on_realtime["runplane.v1.RealtimeService"] == _methods(
        realtime_service_pb2, "RealtimeService"
    )
    for listing in (on_scheduler, on_realtime):
        assert "grpc.health.v1.Health" in listing
