"""The client: ``runplane.Client`` and the module-level namespaces bound to a default client.

Every call is async and has a synchronous twin named ``<name>_sync`` for code without an event
loop. The twins run the async call on a private event-loop thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from runplane import _durations
from runplane._auth import AuthAPI
from runplane._batch import BatchAPI
from runplane._context import current_context
from runplane._durations import DurationLike
from runplane._errors import ConfigurationError
from runplane._hooks import GlobalHooks
from runplane._idempotency import IdempotencyKeysAPI
from runplane._logger import LogEntry
from runplane._models import BatchHandle, BatchItem, Run, RunHandle, RunStatus
from runplane._namespace import Namespace
from runplane._queues import QueuesAPI
from runplane._realtime import subscribe_to_batch, subscribe_to_run, subscribe_to_runs_with_tag
from runplane._schedules import SchedulesAPI
from runplane._serde import dumps
from runplane._timeline import RunPage, RunTimeline
from runplane._transport import Transport, provide_default
from runplane._trigger import batch_trigger, task_items, trigger
from runplane._versions import VersionsAPI
from runplane.tls import TlsSettings
from runplane.v1 import run_pb2
from runplane.v1 import run_service_pb2 as rpb

DEFAULT_API_URL = "localhost:7070"


class Client:
    """A connection to one runplane installation with one key.

    ``api_url`` defaults to ``RUNPLANE_API_URL`` (``localhost:7070``), ``secret_key`` to
    ``RUNPLANE_SECRET_KEY``, ``realtime_url`` to ``RUNPLANE_REALTIME_URL`` or what the scheduler
    announces. TLS: ``tls_ca`` (``RUNPLANE_TLS_CA``) is the PEM file of the CA the servers'
    certificates are checked against, and turns TLS on (so does an ``https://`` or ``grpcs://``
    URL, with the system's roots); ``tls_cert`` and ``tls_key`` (``RUNPLANE_TLS_CERT``,
    ``RUNPLANE_TLS_KEY``) a client certificate for servers that require one. See
    :mod:`runplane.tls`."""

    def __init__(
        self,
        api_url: str | None = None,
        secret_key: str | None = None,
        realtime_url: str | None = None,
        *,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        env = TlsSettings.from_env()
        tls = TlsSettings(
            cert=env.cert if tls_cert is None else tls_cert,
            key=env.key if tls_key is None else tls_key,
            ca=env.ca if tls_ca is None else tls_ca,
        )
        tls.check()
        self.transport = Transport(
            api_url=api_url or os.environ.get("RUNPLANE_API_URL") or DEFAULT_API_URL,
            secret_key=secret_key or os.environ.get("RUNPLANE_SECRET_KEY") or "",
            realtime_url=realtime_url or os.environ.get("RUNPLANE_REALTIME_URL") or "",
            tls=tls,
        )
        self.tasks = TasksAPI(self)
        self.runs = RunsAPI(self)
        self.batch = BatchAPI(self)
        self.queues = QueuesAPI(self)
        self.idempotency_keys = IdempotencyKeysAPI(self)
        self.tags = TagsAPI(self)
        self.schedules = SchedulesAPI(self)
        self.auth = AuthAPI(self)
        self.versions = VersionsAPI(self)

    @property
    def api_url(self) -> str:
        return self.transport.api_url

    @api_url.setter
    def api_url(self, value: str) -> None:
        self.transport.api_url = value

    @property
    def secret_key(self) -> str:
        return self.transport.secret_key

    @secret_key.setter
    def secret_key(self, value: str) -> None:
        self.transport.secret_key = value

    @property
    def tls(self) -> TlsSettings:
        return self.transport.tls

    @tls.setter
    def tls(self, value: TlsSettings) -> None:
        self.transport.tls = value

    async def close(self) -> None:
        """Close this client's channels of the running event loop."""
        await self.transport.close()


class TasksAPI(Namespace, GlobalHooks):
    """Trigger tasks by id; register global hooks (``tasks.on_success(fn)``, see _hooks)."""

    async def trigger(self, task_id: str, payload: Any = None, **options: Any) -> RunHandle:
        """Trigger a run of ``task_id`` with ``payload`` (anything JSON-serialisable); the
        options are :func:`runplane._trigger.trigger_options`' keyword arguments."""
        return await trigger(self._transport, task_id, payload, **options)

    def trigger_sync(self, task_id: str, payload: Any = None, **options: Any) -> RunHandle:
        return self._transport.run_sync(self.trigger(task_id, payload, **options))

    async def batch_trigger(
        self,
        task_id: str,
        items: Sequence[BatchItem | Any],
        *,
        idempotency_key: str | None = None,
    ) -> BatchHandle:
        """Trigger up to 1,000 runs of ``task_id`` at once, all or none; each item is
        ``{"payload": ..., "options": {...}}``."""
        return await batch_trigger(self._transport, task_items(task_id, items), idempotency_key)

    def batch_trigger_sync(
        self, task_id: str, items: Sequence[BatchItem | Any], **kwargs: Any
    ) -> BatchHandle:
        return self._transport.run_sync(self.batch_trigger(task_id, items, **kwargs))


class RunsAPI(Namespace):
    """Read, list, cancel and follow runs."""

    async def retrieve(self, run_id: str | RunHandle) -> Run:
        transport = self._transport
        run_id = run_id.id if isinstance(run_id, RunHandle) else run_id
        response = await transport.call(
            transport.run_stub().GetRun, rpb.GetRunRequest(run_id=run_id)
        )
        return Run.from_pb(response.run)

    def retrieve_sync(self, run_id: str | RunHandle) -> Run:
        return self._transport.run_sync(self.retrieve(run_id))

    async def cancel(self, run_id: str | RunHandle) -> Run:
        transport = self._transport
        run_id = run_id.id if isinstance(run_id, RunHandle) else run_id
        response = await transport.call(
            transport.run_stub().CancelRun, rpb.CancelRunRequest(run_id=run_id)
        )
        return Run.from_pb(response.run)

    def cancel_sync(self, run_id: str | RunHandle) -> Run:
        return self._transport.run_sync(self.cancel(run_id))

    async def list(
        self,
        *,
        status: RunStatus | str | Sequence[RunStatus | str] | None = None,
        task: str | Sequence[str] | None = None,
        tag: str | Sequence[str] | None = None,
        batch: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int | None = None,
        page_size: int = 25,
        version: str | None = None,
    ) -> AsyncIterator[Run]:
        """Runs, newest first, fetched a page at a time; stops after ``limit`` runs.
        ``version``: only the runs locked to that worker version."""
        statuses = [status] if isinstance(status, str) else list(status or [])
        request = rpb.ListRunsRequest(
            statuses=[run_pb2.RunStatus.ValueType(RunStatus(s).to_pb()) for s in statuses],
            task_ids=[task] if isinstance(task, str) else list(task or []),
            tags=[tag] if isinstance(tag, str) else list(tag or []),
            batch_id=batch or "",
            page_size=page_size,
            version=version or "",
        )
        if created_after is not None:
            request.created_after.FromDatetime(created_after)
        if created_before is not None:
            request.created_before.FromDatetime(created_before)
        transport = self._transport
        async for pb in transport.paged(transport.run_stub().ListRuns, request, "runs", limit):
            yield Run.from_pb(pb)

    def list_sync(self, **filters: Any) -> Iterator[Run]:
        return self._transport.iterate_sync(self.list(**filters))

    async def page(
        self,
        *,
        status: RunStatus | str | Sequence[RunStatus | str] | None = None,
        task: str | Sequence[str] | None = None,
        tag: str | Sequence[str] | None = None,
        batch: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        page_size: int = 25,
        version: str | None = None,
        page_token: str | None = None,
    ) -> RunPage:
        """One page of runs, newest first, with ``list``'s filters; pass the page's
        ``next_page_token`` (with the same filters) for the next one."""
        statuses = [status] if isinstance(status, str) else list(status or [])
        request = rpb.ListRunsRequest(
            statuses=[run_pb2.RunStatus.ValueType(RunStatus(s).to_pb()) for s in statuses],
            task_ids=[task] if isinstance(task, str) else list(task or []),
            tags=[tag] if isinstance(tag, str) else list(tag or []),
            batch_id=batch or "",
            page_size=page_size,
            version=version or "",
            page_token=page_token or "",
        )
        if created_after is not None:
            request.created_after.FromDatetime(created_after)
        if created_before is not None:
            request.created_before.FromDatetime(created_before)
        transport = self._transport
        response = await transport.call(transport.run_stub().ListRuns, request)
        return RunPage(
            runs=[Run.from_pb(pb) for pb in response.runs],
            next_page_token=response.next_page_token or None,
        )

    def page_sync(self, **filters: Any) -> RunPage:
        return self._transport.run_sync(self.page(**filters))

    async def timeline(self, run_id: str | RunHandle) -> RunTimeline:
        """The run's waterfall: the intervals it spent queued, its attempts, waits, child runs
        and log lines."""
        transport = self._transport
        run_id = run_id.id if isinstance(run_id, RunHandle) else run_id
        response = await transport.call(
            transport.run_stub().GetRunTimeline, rpb.GetRunTimelineRequest(run_id=run_id)
        )
        return RunTimeline.from_pb(response)

    def timeline_sync(self, run_id: str | RunHandle) -> RunTimeline:
        return self._transport.run_sync(self.timeline(run_id))

    async def replay(self, run_id: str | RunHandle) -> RunHandle:
        """A new run of the same task with the same payload (``ctx.run.is_replay`` is true)."""
        transport = self._transport
        run_id = run_id.id if isinstance(run_id, RunHandle) else run_id
        response = await transport.call(
            transport.run_stub().ReplayRun, rpb.ReplayRunRequest(run_id=run_id)
        )
        return RunHandle(id=response.run.id, run=Run.from_pb(response.run))

    def replay_sync(self, run_id: str | RunHandle) -> RunHandle:
        return self._transport.run_sync(self.replay(run_id))

    async def reschedule(self, run_id: str | RunHandle, *, delay: DurationLike | datetime) -> Run:
        """Move a DELAYED run's start to ``delay`` from now (or to a datetime)."""
        transport = self._transport
        run_id = run_id.id if isinstance(run_id, RunHandle) else run_id
        request = rpb.RescheduleRunRequest(run_id=run_id)
        if isinstance(delay, datetime):
            request.delay_until.CopyFrom(_durations.timestamp_pb(delay))
        else:
            request.delay.CopyFrom(_durations.to_pb(delay, "delay"))
        response = await transport.call(transport.run_stub().RescheduleRun, request)
        return Run.from_pb(response.run)

    def reschedule_sync(self, run_id: str | RunHandle, **kwargs: Any) -> Run:
        return self._transport.run_sync(self.reschedule(run_id, **kwargs))

    async def poll(
        self, run_id: str | RunHandle, *, interval: float = 0.5, timeout: float | None = None
    ) -> Run:
        """Wait for the run to reach a final status by polling; returns the final run."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            run = await self.retrieve(run_id)
            if run.is_completed:
                return run
            if deadline is not None and loop.time() > deadline:
                raise TimeoutError(f"run {run.id} still {run.status} after {timeout} s")
            await asyncio.sleep(interval)

    def poll_sync(self, run_id: str | RunHandle, **kwargs: Any) -> Run:
        return self._transport.run_sync(self.poll(run_id, **kwargs))

    async def subscribe_to_run(
        self, run_id: str | RunHandle, *, stop_on_completion: bool = True, after_version: int = 0
    ) -> AsyncIterator[Run]:
        """The run now, then on every change (status, metadata, tags, output), in order; ends
        after its final status unless ``stop_on_completion=False``. Reconnects transparently."""
        transport = self._transport
        run_id = run_id.id if isinstance(run_id, RunHandle) else run_id
        channel = await transport.realtime_channel()
        async for pb in subscribe_to_run(
            channel,
            transport.metadata(),
            run_id,
            stop_on_completion=stop_on_completion,
            after_version=after_version,
        ):
            yield Run.from_pb(pb)

    def subscribe_to_run_sync(self, run_id: str | RunHandle, **kwargs: Any) -> Iterator[Run]:
        return self._transport.iterate_sync(self.subscribe_to_run(run_id, **kwargs))

    async def update_metadata(self, run_id: str | RunHandle, metadata: dict[str, Any]) -> Run:
        """Replace the run's metadata object (from outside the run; inside it use ``metadata``)."""
        transport = self._transport
        run_id = run_id.id if isinstance(run_id, RunHandle) else run_id
        response = await transport.call(
            transport.run_stub().UpdateRunMetadata,
            rpb.UpdateRunMetadataRequest(run_id=run_id, metadata=dumps(metadata)),
        )
        return Run.from_pb(response.run)

    def update_metadata_sync(self, run_id: str | RunHandle, metadata: dict[str, Any]) -> Run:
        return self._transport.run_sync(self.update_metadata(run_id, metadata))

    async def logs(
        self, run_id: str | RunHandle, *, page_size: int = 100
    ) -> AsyncIterator[LogEntry]:
        """The run's log lines (and finished ``logger.trace`` spans), oldest first."""
        transport = self._transport
        request = rpb.ListRunLogsRequest(
            run_id=run_id.id if isinstance(run_id, RunHandle) else run_id, page_size=page_size
        )
        async for pb in transport.paged(transport.run_stub().ListRunLogs, request, "entries"):
            yield LogEntry.from_pb(pb)

    def logs_sync(self, run_id: str | RunHandle, **kwargs: Any) -> Iterator[LogEntry]:
        return self._transport.iterate_sync(self.logs(run_id, **kwargs))

    async def subscribe_to_runs_with_tag(
        self, tag: str, *, created_after: datetime | timedelta = timedelta(hours=24)
    ) -> AsyncIterator[Run]:
        """The runs with ``tag`` created since ``created_after`` (a time, or how long ago: the
        last 24 hours by default; at most 7 days), then every change of them and of new runs
        with the tag, in order per run. Never ends by itself; reconnects transparently."""
        if isinstance(created_after, timedelta):
            created_after = datetime.now(UTC) - created_after
        transport = self._transport
        channel = await transport.realtime_channel()
        async for pb in subscribe_to_runs_with_tag(
            channel, transport.metadata(), tag, created_after
        ):
            yield Run.from_pb(pb)

    def subscribe_to_runs_with_tag_sync(self, tag: str, **kwargs: Any) -> Iterator[Run]:
        return self._transport.iterate_sync(self.subscribe_to_runs_with_tag(tag, **kwargs))

    async def subscribe_to_batch(self, batch_id: str) -> AsyncIterator[Run]:
        """The runs of a batch, then every change of them, in order per run. Never ends by
        itself; reconnects transparently."""
        transport = self._transport
        channel = await transport.realtime_channel()
        async for pb in subscribe_to_batch(channel, transport.metadata(), batch_id):
            yield Run.from_pb(pb)

    def subscribe_to_batch_sync(self, batch_id: str) -> Iterator[Run]:
        return self._transport.iterate_sync(self.subscribe_to_batch(batch_id))


class TagsAPI(Namespace):
    """Tags of the running run: ``await tags.add("user:42")`` inside a task."""

    async def add(self, tags: str | Sequence[str], *, run_id: str | None = None) -> Run:
        """Add tags to the run this code runs in (or ``run_id``); at most 10 per run."""
        if run_id is None:
            ctx = current_context()
            if ctx is None:
                raise ConfigurationError("tags.add outside a run needs run_id=")
            run_id = ctx.run.id
        transport = self._transport
        response = await transport.call(
            transport.run_stub().AddRunTags,
            rpb.AddRunTagsRequest(run_id=run_id, tags=[tags] if isinstance(tags, str) else tags),
        )
        return Run.from_pb(response.run)

    def add_sync(self, tags: str | Sequence[str], *, run_id: str | None = None) -> Run:
        return self._transport.run_sync(self.add(tags, run_id=run_id))


_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The client the module-level functions use, configured from the environment."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def configure(
    api_url: str | None = None, secret_key: str | None = None, realtime_url: str | None = None
) -> Client:
    """Replace the default client."""
    global _default
    with _default_lock:
        _default = Client(api_url=api_url, secret_key=secret_key, realtime_url=realtime_url)
        return _default


# The module-level namespaces (and those of clients made without one) call through the default
# client's transport.
provide_default(lambda: default_client().transport)

tasks = TasksAPI(None)
runs = RunsAPI(None)
tags = TagsAPI(None)
auth = AuthAPI(None)
