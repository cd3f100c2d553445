"""VersionService: the environment's worker versions, promotion and rollback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runplane.v1 import version_service_pb2 as vpb
from runplane.v1 import version_service_pb2_grpc
from runplane_common.auth import principal
from runplane_scheduler import validation
from runplane_scheduler.api import Context
from runplane_scheduler.engine import RunEngine
from runplane_scheduler.store import timestamp


def version_pb(m: Mapping[str, Any]) -> vpb.WorkerVersion:
    out = vpb.WorkerVersion(
        version=m["version"],
        task_ids=m["tasks"],
        current_for=m["current_for"],
        rolled_back=bool(m["rolled_back"]),
        executors=m["executors"],
        active_runs=m["active_runs"],
    )
    if (created := timestamp(m["created_at"])) is not None:
        out.created_at.CopyFrom(created)
    if (promoted := timestamp(m["promoted_at"])) is not None:
        out.promoted_at.CopyFrom(promoted)
    return out


class VersionServicer(version_service_pb2_grpc.VersionServiceServicer):
    def __init__(self, engine: RunEngine) -> None:
        self.engine = engine

    async def _one(self, version: str) -> vpb.WorkerVersion:
        for m in await self.engine.list_versions(principal().environment_id):
            if m["version"] == version:
                return version_pb(m)
        return vpb.WorkerVersion(version=version)

    async def ListVersions(
        self, request: vpb.ListVersionsRequest, context: Context
    ) -> vpb.ListVersionsResponse:
        rows = await self.engine.list_versions(principal().environment_id)
        return vpb.ListVersionsResponse(versions=[version_pb(m) for m in rows])

    async def PromoteVersion(
        self, request: vpb.PromoteVersionRequest, context: Context
    ) -> vpb.PromoteVersionResponse:
        version = validation.version(request.version)
        await self.engine.promote_version(principal().environment_id, version)
        return vpb.PromoteVersionResponse(version=await self._one(version))

    async def RollbackVersion(
        self, request: vpb.RollbackVersionRequest, context: Context
    ) -> vpb.RollbackVersionResponse:
        wv = await self.engine.rollback_version(principal().environment_id)
        return vpb.RollbackVersionResponse(version=await self._one(wv.version))

    async def MigrateRuns(
        self, request: vpb.MigrateRunsRequest, context: Context
    ) -> vpb.MigrateRunsResponse:
        run_ids, from_version, to_version = validation.migration(request)
        migrated, skipped = await self.engine.migrate_runs(
            principal().environment_id, run_ids, from_version, to_version
        )
        return vpb.MigrateRunsResponse(migrated=migrated, skipped=skipped)
