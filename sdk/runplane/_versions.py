"""``versions``: the worker versions executors registered, which one new runs lock to, and
promotion and rollback (what ``runplane deploy`` and ``runplane versions`` do)."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from runplane._models import _dt
from runplane._namespace import Namespace
from runplane.v1 import version_service_pb2 as vpb
from runplane.v1 import version_service_pb2_grpc


@dataclass(frozen=True)
class WorkerVersion:
    """A registered worker version: its tasks, the tasks it is current for, its executors
    connected now, and how many unfinished runs are locked to it."""

    version: str
    task_ids: list[str]
    current_for: list[str]
    created_at: datetime | None
    promoted_at: datetime | None
    rolled_back: bool
    executors: int
    active_runs: int

    @property
    def is_current(self) -> bool:
        return bool(self.current_for)


@dataclass(frozen=True)
class RunsMigrated:
    """What :meth:`VersionsAPI.migrate_runs` did: the runs moved (or failed), and the runs asked
    for by id that were not waiting in PENDING_VERSION (left as they are)."""

    migrated: list[str]
    skipped: list[str]


def _version(v: vpb.WorkerVersion) -> WorkerVersion:
    return WorkerVersion(
        version=v.version,
        task_ids=list(v.task_ids),
        current_for=list(v.current_for),
        created_at=_dt(v.created_at, v.HasField("created_at")),
        promoted_at=_dt(v.promoted_at, v.HasField("promoted_at")),
        rolled_back=v.rolled_back,
        executors=v.executors,
        active_runs=v.active_runs,
    )


class VersionsAPI(Namespace):
    def _stub(self) -> version_service_pb2_grpc.VersionServiceStub:
        return version_service_pb2_grpc.VersionServiceStub(self._transport.channel())

    async def list(self) -> list[WorkerVersion]:
        """The environment's versions, newest first."""
        response = await self._transport.call(self._stub().ListVersions, vpb.ListVersionsRequest())
        return [_version(v) for v in response.versions]

    def list_sync(self) -> builtins.list[WorkerVersion]:
        return self._transport.run_sync(self.list())

    async def promote(self, version: str) -> WorkerVersion:
        """Make ``version`` current: new runs of its tasks lock to it."""
        response = await self._transport.call(
            self._stub().PromoteVersion, vpb.PromoteVersionRequest(version=version)
        )
        return _version(response.version)

    def promote_sync(self, version: str) -> WorkerVersion:
        return self._transport.run_sync(self.promote(version))

    async def rollback(self) -> WorkerVersion:
        """Undo the latest promotion; returns the version that is current again."""
        response = await self._transport.call(
            self._stub().RollbackVersion, vpb.RollbackVersionRequest()
        )
        return _version(response.version)

    def rollback_sync(self) -> WorkerVersion:
        return self._transport.run_sync(self.rollback())

    async def migrate_runs(
        self,
        run_ids: Sequence[str] = (),
        *,
        from_version: str = "",
        to_version: str = "",
        fail: bool = False,
    ) -> RunsMigrated:
        """Move runs waiting in PENDING_VERSION (``run_ids``, or every one locked to
        ``from_version``) to ``to_version``, where a run that was waiting replays its journal
        on that version's code; or, with ``fail=True``, fail them. An operator's decision that
        their version's executors are gone for good: replaying on other code is only safe when
        it makes the same waits in the same order."""
        response = await self._transport.call(
            self._stub().MigrateRuns,
            vpb.MigrateRunsRequest(
                run_ids=list(run_ids),
                from_version=from_version,
                to_version=to_version,
                fail=fail,
            ),
        )
        return RunsMigrated(migrated=list(response.migrated), skipped=list(response.skipped))

    def migrate_runs_sync(
        self,
        run_ids: Sequence[str] = (),
        *,
        from_version: str = "",
        to_version: str = "",
        fail: bool = False,
    ) -> RunsMigrated:
        return self._transport.run_sync(
            self.migrate_runs(run_ids, from_version=from_version, to_version=to_version, fail=fail)
        )
