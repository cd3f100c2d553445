"""``batch``: trigger runs of several tasks at once (all or none) and read batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from runplane._errors import ConfigurationError
from runplane._models import Batch, BatchHandle, BatchStatus, _dt
from runplane._namespace import Namespace
from runplane._trigger import batch_trigger, child_item
from runplane._wait import Result, wait_for_children
from runplane.v1 import run_service_pb2 as rpb


class BatchAPI(Namespace):
    async def trigger(
        self, items: Sequence[dict[str, Any]], *, idempotency_key: str | None = None
    ) -> BatchHandle:
        """Trigger ``[{"id": task_id, "payload": ..., "options": {...}}, ...]`` (up to 1,000
        items) in one transaction: every run is created, in item order, or none is."""
        return await batch_trigger(self._transport, items, idempotency_key)

    def trigger_sync(self, items: Sequence[dict[str, Any]], **kwargs: Any) -> BatchHandle:
        return self._transport.run_sync(self.trigger(items, **kwargs))

    async def trigger_by_task(
        self, items: Sequence[dict[str, Any]], *, idempotency_key: str | None = None
    ) -> BatchHandle:
        """Like :meth:`trigger` with task objects: ``[{"task": my_task, "payload": ...}]``."""
        entries = []
        for i, item in enumerate(items):
            task = item.get("task") if isinstance(item, dict) else None
            if task is None or not hasattr(task, "id"):
                raise ConfigurationError(f'batch item {i}: expected {{"task": a Task, ...}}')
            entries.append({**item, "id": task.id})
        return await self.trigger(entries, idempotency_key=idempotency_key)

    def trigger_by_task_sync(self, items: Sequence[dict[str, Any]], **kwargs: Any) -> BatchHandle:
        return self._transport.run_sync(self.trigger_by_task(items, **kwargs))

    async def trigger_and_wait(self, items: Sequence[dict[str, Any]]) -> list[Result[Any]]:
        """Inside a run: trigger ``[{"id": task_id, "payload": ..., "options": {...}}]`` as
        child runs and wait for all of them; results in item order."""
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "id" not in item:
                raise ConfigurationError(
                    f'batch item {i}: expected {{"id": ..., "payload": ..., "options": {{...}}}}'
                )
        return await wait_for_children(
            "batch.trigger_and_wait",
            [
                child_item(item["id"], item.get("payload"), item.get("options") or {})
                for item in items
            ],
        )

    async def trigger_by_task_and_wait(self, items: Sequence[dict[str, Any]]) -> list[Result[Any]]:
        """Like :meth:`trigger_and_wait` with task objects: ``[{"task": my_task, ...}]``."""
        entries = []
        for i, item in enumerate(items):
            task = item.get("task") if isinstance(item, dict) else None
            if task is None or not hasattr(task, "id"):
                raise ConfigurationError(f'batch item {i}: expected {{"task": a Task, ...}}')
            entries.append({**item, "id": task.id})
        return await self.trigger_and_wait(entries)

    async def retrieve(self, batch_id: str | BatchHandle) -> Batch:
        transport = self._transport
        batch_id = batch_id.batch_id if isinstance(batch_id, BatchHandle) else batch_id
        response = await transport.call(
            transport.run_stub().GetBatch, rpb.GetBatchRequest(batch_id=batch_id)
        )
        b = response.batch
        return Batch(
            id=b.id,
            status=BatchStatus(rpb.BatchStatus.Name(b.status).removeprefix("BATCH_STATUS_")),
            run_count=b.run_count,
            runs=list(b.run_ids),
            idempotency_key=b.idempotency_key or None,
            created_at=_dt(b.created_at, b.HasField("created_at")),
        )

    def retrieve_sync(self, batch_id: str | BatchHandle) -> Batch:
        return self._transport.run_sync(self.retrieve(batch_id))


batch = BatchAPI(None)
