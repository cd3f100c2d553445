"""The client: ``runplane.Client`` and the module-level namespaces bound to a default client.

Every call is async and has a synchronous twin named ``<name>_sync`` for code without an event
loop. The twins run the async call on a private event-loop thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
from opentelemetry import propagate

from runplane import _durations, _idempotency
from runplane._auth import AuthAPI
from runplane._context import current_context
from runplane._durations import DurationLike
from runplane._errors import ConfigurationError, from_rpc_error
from runplane._hooks import GlobalHooks
from runplane._logger import LogEntry
from runplane._models import BatchHandle, BatchItem, Run, RunHandle, RunStatus
from runplane._namespace import Namespace
from runplane._serde import dumps
from runplane.tls import TlsSettings, open_channel
from runplane.v1 import (
    meta_service_pb2,
    meta_service_pb2_grpc,
    run_pb2,
    run_service_pb2_grpc,
)
from runplane.v1 import (
    run_service_pb2 as rpb,
)

T = TypeVar("T")

DEFAULT_API_URL = "localhost:7070"


class _LoopThread:
    """A daemon thread running an event loop, for the synchronous twins."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="runplane-sync", daemon=True).start()
                self._loop = loop
            return self._loop

    def run(self, coro: Awaitable[T]) -> T:
        async def wrapper() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop()).result()

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        while True:
            try:
                yield self.run(agen.__anext__())
            except StopAsyncIteration:
                return


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
        self.api_url = api_url or os.environ.get("RUNPLANE_API_URL") or DEFAULT_API_URL
        self.secret_key = secret_key or os.environ.get("RUNPLANE_SECRET_KEY") or ""
        self._realtime_url = realtime_url or os.environ.get("RUNPLANE_REALTIME_URL") or ""
        env = TlsSettings.from_env()
        self.tls = TlsSettings(
            cert=env.cert if tls_cert is None else tls_cert,
            key=env.key if tls_key is None else tls_key,
            ca=env.ca if tls_ca is None else tls_ca,
        )
        self.tls.check()
        self._channels: dict[tuple[int, str], grpc.aio.Channel] = {}
        self._run_stubs: dict[int, run_service_pb2_grpc.RunServiceStub] = {}
        self._sync = _LoopThread()
        from runplane._batch import BatchAPI
        from runplane._idempotency import IdempotencyKeysAPI
        from runplane._queues import QueuesAPI

        self.tasks = TasksAPI(self)
        self.runs = RunsAPI(self)
        self.batch = BatchAPI(self)
        self.queues = QueuesAPI(self)
        self.idempotency_keys = IdempotencyKeysAPI(self)
        self.tags = TagsAPI(self)
        from runplane._schedules import SchedulesAPI  # it builds on this module

        self.schedules = SchedulesAPI(self)
        self.auth = AuthAPI(self)

    # -- plumbing ----------------------------------------------------------------------------

    def _channel(self, target: str | None = None) -> grpc.aio.Channel:
        """The gRPC channel to ``target`` (default: the scheduler) for the running event loop."""
        target = target or self.api_url
        key = (id(asyncio.get_running_loop()), target)
        channel = self._channels.get(key)
        if channel is None:
            channel = open_channel(
                target,
                self.tls,
                options=[
                    ("grpc.max_send_message_length", 16 * 1024 * 1024),
                    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ],
            )
            self._channels[key] = channel
        return channel

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if not self.secret_key:
            raise ConfigurationError(
                "no secret key: pass Client(secret_key=...) or set RUNPLANE_SECRET_KEY "
                "(`runplane dev` writes one to .runplane/dev.env)"
            )
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return (("authorization", f"Bearer {self.secret_key}"), *carrier.items())

    async def _call(
        self, method: Callable[..., Any], request: Any, timeout: float | None = 30
    ) -> Any:
        try:
            return await method(request, metadata=self._metadata(), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def _paged(
        self, method: Callable[..., Any], request: Any, items: str, limit: int | None = None
    ) -> AsyncIterator[Any]:
        """Every item (field ``items``) of a paged List call, a page at a time; at most
        ``limit``."""
        count = 0
        while True:
            response = await self._call(method, request)
            for pb in getattr(response, items):
                yield pb
                count += 1
                if limit is not None and count >= limit:
                    return
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def _run_stub(self) -> run_service_pb2_grpc.RunServiceStub:
        """The RunService stub on the current loop's channel (built once: a stub makes a
        callable per method, which costs more than the call it is for)."""
        channel = self._channel()
        stub = self._run_stubs.get(id(channel))
        if stub is None:
            stub = self._run_stubs[id(channel)] = run_service_pb2_grpc.RunServiceStub(channel)
        return stub

    async def _resolve_realtime_url(self) -> str:
        if not self._realtime_url:
            stub = meta_service_pb2_grpc.MetaServiceStub(self._channel())
            info = await self._call(stub.GetServerInfo, meta_service_pb2.GetServerInfoRequest())
            if not info.realtime_url:
                raise ConfigurationError(
                    "the scheduler announces no realtime service; set RUNPLANE_REALTIME_URL"
                )
            self._realtime_url = info.realtime_url
        return self._realtime_url

    def _run_sync(self, coro: Awaitable[T]) -> T:
        return self._sync.run(coro)

    def _iterate_sync(self, agen: AsyncIterator[T]) -> Iterator[T]:
        return self._sync.iterate(agen)

    async def close(self) -> None:
        loop_id = id(asyncio.get_running_loop())
        for key in [k for k in self._channels if k[0] == loop_id]:
            channel = self._channels.pop(key)
            self._run_stubs.pop(id(channel), None)
            await channel.close()


def trigger_options(
    *,
    queue: Any = None,
    tags: Sequence[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
    max_attempts: int | None = None,
    idempotency_key: str | Sequence[str] | None = None,
    idempotency_key_ttl: DurationLike | None = None,
    concurrency_key: str | int | None = None,
    priority: int | None = None,
    delay: DurationLike | datetime | None = None,
    ttl: DurationLike | None = None,
    max_duration: DurationLike | None = None,
    machine: str | None = None,
    debounce: dict[str, Any] | None = None,
) -> rpb.TriggerOptions:
    """The options of one trigger (SPEC §3), as the API carries them.

    ``delay`` is a duration or a datetime; ``ttl=0`` opts out of the task's ttl; a plain-string
    ``idempotency_key`` is scoped to the current run when called inside one (see
    :func:`runplane.idempotency_keys.create`). Called inside a run, the new run is its child."""
    if isinstance(tags, str):
        tags = [tags]
    options = rpb.TriggerOptions(
        queue=getattr(queue, "name", queue) or "",
        tags=list(tags or []),
        metadata=dumps(metadata) if metadata is not None else "",
        max_attempts=max_attempts or 0,
        idempotency_key=_idempotency.resolve(idempotency_key),
        concurrency_key=str(concurrency_key) if concurrency_key is not None else "",
        priority=priority or 0,
        machine=machine or "",
    )
    if isinstance(delay, datetime):
        options.delay_until.CopyFrom(_durations.timestamp_pb(delay))
    elif delay is not None:
        options.delay.CopyFrom(_durations.to_pb(delay, "delay"))
    if ttl is not None:
        options.ttl.CopyFrom(_durations.to_pb(ttl, "ttl"))
    if idempotency_key_ttl is not None:
        options.idempotency_key_ttl.CopyFrom(
            _durations.to_pb(idempotency_key_ttl, "idempotency_key_ttl")
        )
    if max_duration is not None:
        options.max_duration.CopyFrom(_durations.to_pb(max_duration, "max_duration"))
    if debounce is not None:
        options.debounce.CopyFrom(_debounce(debounce))
    ctx = current_context()
    if ctx is not None:
        options.parent_run_id = ctx.run.id
    return options


def _debounce(value: dict[str, Any]) -> rpb.Debounce:
    """``{"key": ..., "delay": "5s", "mode": "leading"|"trailing", "max_delay": "1m"}``."""
    unknown = set(value) - {"key", "delay", "mode", "max_delay"}
    if unknown or "key" not in value or "delay" not in value:
        raise ConfigurationError(
            'debounce is {"key": ..., "delay": ..., "mode": "leading"|"trailing", '
            f'"max_delay": ...}}, got {value!r}'
        )
    mode = value.get("mode", "leading")
    if mode not in ("leading", "trailing"):
        raise ConfigurationError(f'debounce mode is "leading" or "trailing", got {mode!r}')
    d = rpb.Debounce(
        key=str(value["key"]),
        mode=rpb.DEBOUNCE_MODE_TRAILING if mode == "trailing" else rpb.DEBOUNCE_MODE_LEADING,
    )
    d.delay.CopyFrom(_durations.to_pb(value["delay"], "debounce.delay"))
    if value.get("max_delay") is not None:
        d.max_delay.CopyFrom(_durations.to_pb(value["max_delay"], "debounce.max_delay"))
    return d


class TasksAPI(Namespace, GlobalHooks):
    """Trigger tasks by id; register global hooks (``tasks.on_success(fn)``, see _hooks)."""

    async def trigger(self, task_id: str, payload: Any = None, **options: Any) -> RunHandle:
        """Trigger a run of ``task_id`` with ``payload`` (anything JSON-serialisable); the
        options are :func:`trigger_options`' keyword arguments."""
        request = rpb.TriggerRunRequest(
            task_id=task_id, payload=dumps(payload), options=trigger_options(**options)
        )
        client = self._client
        response = await client._call(client._run_stub().TriggerRun, request)
        return RunHandle(
            id=response.run.id,
            is_cached=response.is_cached,
            run=Run.from_pb(response.run),
            public_access_token=response.public_access_token,
        )

    def trigger_sync(self, task_id: str, payload: Any = None, **options: Any) -> RunHandle:
        return self._client._run_sync(self.trigger(task_id, payload, **options))

    async def batch_trigger(
        self,
        task_id: str,
        items: Sequence[BatchItem | Any],
        *,
        idempotency_key: str | None = None,
    ) -> BatchHandle:
        """Trigger up to 1,000 runs of ``task_id`` at once, all or none; each item is
        ``{"payload": ..., "options": {...}}``."""
        from runplane._batch import BatchAPI

        entries = [{"id": task_id, **_as_item(item)} for item in items]
        return await BatchAPI(self._bound).trigger(entries, idempotency_key=idempotency_key)

    def batch_trigger_sync(
        self, task_id: str, items: Sequence[BatchItem | Any], **kwargs: Any
    ) -> BatchHandle:
        return self._client._run_sync(self.batch_trigger(task_id, items, **kwargs))


def _as_item(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict) or "payload" not in item:
        raise ConfigurationError('a batch item is {"payload": ..., "options": {...}}')
    return {"payload": item["payload"], "options": item.get("options") or {}}


class RunsAPI(Namespace):
    """Read, list, cancel and follow runs."""

    async def retrieve(self, run_id: str | RunHandle) -> Run:
        client = self._client
        run_id = run_id.id if isinstance(run_id, RunHandle) else run_id
        response = await client._call(client._run_stub().GetRun, rpb.GetRunRequest(run_id=run_id))
        return Run.from_pb(response.run)

    def retrieve_sync(self, run_id: str | RunHandle) -> Run:
        return self._client._run_sync(self.retrieve(run_id))

    async def cancel(self, run_id: str | RunHandle) -> Run:
        client = self._client
        run_id = run_id.id if isinstance(run_id, RunHandle) else run_id
        response = await client._call(
            client._run_stub().CancelRun, rpb.CancelRunRequest(run_id=run_id)
        )
        return Run.from_pb(response.run)

    def cancel_sync(self, run_id: str | RunHandle) -> Run:
        return self._client._run_sync(self.cancel(run_id))

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
    ) -> AsyncIterator[Run]:
        """Runs, newest first, fetched a page at a time; stops after ``limit`` runs."""
        statuses = [status] if isinstance(status, str) else list(status or [])
        request = rpb.ListRunsRequest(
            statuses=[run_pb2.RunStatus.ValueType(RunStatus(s).to_pb()) for s in statuses],
            task_ids=[task] if isinstance(task, str) else list(task or []),
            tags=[tag] if isinstance(tag, str) else list(tag or []),
            batch_id=batch or "",
            page_size=page_size,
        )
        if created_after is not None:
            request.created_after.FromDatetime(created_after)
        if created_before is not None:
            request.created_before.FromDatetime(created_before)
        client = self._client
        async for pb in client._paged(client._run_stub().ListRuns, request, "runs", limit):
            yield Run.from_pb(pb)

    def list_sync(self, **filters: Any) -> Iterator[Run]:
        return self._client._iterate_sync(self.list(**filters))

    async def replay(self, run_id: str | RunHandle) -> RunHandle:
        """A new run of the same task with the same payload (``ctx.run.is_replay`` is true)."""
        client = self._client
        run_id = run_id.id if isinstance(run_id, RunHandle) else run_id
        response = await client._call(
            client._run_stub().ReplayRun, rpb.ReplayRunRequest(run_id=run_id)
        )
        return RunHandle(id=response.run.id, run=Run.from_pb(response.run))

    def replay_sync(self, run_id: str | RunHandle) -> RunHandle:
        return self._client._run_sync(self.replay(run_id))

    async def reschedule(self, run_id: str | RunHandle, *, delay: DurationLike | datetime) -> Run:
        """Move a DELAYED run's start to ``delay`` from now (or to a datetime)."""
        client = self._client
        run_id = run_id.id if isinstance(run_id, RunHandle) else run_id
        request = rpb.RescheduleRunRequest(run_id=run_id)
        if isinstance(delay, datetime):
            request.delay_until.CopyFrom(_durations.timestamp_pb(delay))
        else:
            request.delay.CopyFrom(_durations.to_pb(delay, "delay"))
        response = await client._call(client._run_stub().RescheduleRun, request)
        return Run.from_pb(response.run)

    def reschedule_sync(self, run_id: str | RunHandle, **kwargs: Any) -> Run:
        return self._client._run_sync(self.reschedule(run_id, **kwargs))

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
        return self._client._run_sync(self.poll(run_id, **kwargs))

    async def subscribe_to_run(
        self, run_id: str | RunHandle, *, stop_on_completion: bool = True, after_version: int = 0
    ) -> AsyncIterator[Run]:
        """The run now, then on every change (status, metadata, tags, output), in order; ends
        after its final status unless ``stop_on_completion=False``. Reconnects transparently."""
        from runplane._realtime import subscribe_to_run

        client = self._client
        run_id = run_id.id if isinstance(run_id, RunHandle) else run_id
        channel = client._channel(await client._resolve_realtime_url())
        async for pb in subscribe_to_run(
            channel,
            client._metadata(),
            run_id,
            stop_on_completion=stop_on_completion,
            after_version=after_version,
        ):
            yield Run.from_pb(pb)

    def subscribe_to_run_sync(self, run_id: str | RunHandle, **kwargs: Any) -> Iterator[Run]:
        return self._client._iterate_sync(self.subscribe_to_run(run_id, **kwargs))

    async def update_metadata(self, run_id: str | RunHandle, metadata: dict[str, Any]) -> Run:
        """Replace the run's metadata object (from outside the run; inside it use ``metadata``)."""
        client = self._client
        run_id = run_id.id if isinstance(run_id, RunHandle) else run_id
        response = await client._call(
            client._run_stub().UpdateRunMetadata,
            rpb.UpdateRunMetadataRequest(run_id=run_id, metadata=dumps(metadata)),
        )
        return Run.from_pb(response.run)

    def update_metadata_sync(self, run_id: str | RunHandle, metadata: dict[str, Any]) -> Run:
        return self._client._run_sync(self.update_metadata(run_id, metadata))

    async def logs(
        self, run_id: str | RunHandle, *, page_size: int = 100
    ) -> AsyncIterator[LogEntry]:
        """The run's log lines (and finished ``logger.trace`` spans), oldest first."""
        client = self._client
        request = rpb.ListRunLogsRequest(
            run_id=run_id.id if isinstance(run_id, RunHandle) else run_id, page_size=page_size
        )
        async for pb in client._paged(client._run_stub().ListRunLogs, request, "entries"):
            yield LogEntry.from_pb(pb)

    def logs_sync(self, run_id: str | RunHandle, **kwargs: Any) -> Iterator[LogEntry]:
        return self._client._iterate_sync(self.logs(run_id, **kwargs))

    async def subscribe_to_runs_with_tag(
        self, tag: str, *, created_after: datetime | timedelta = timedelta(hours=24)
    ) -> AsyncIterator[Run]:
        """The runs with ``tag`` created since ``created_after`` (a time, or how long ago: the
        last 24 hours by default; at most 7 days), then every change of them and of new runs
        with the tag, in order per run. Never ends by itself; reconnects transparently."""
        from runplane._realtime import subscribe_to_runs_with_tag

        if isinstance(created_after, timedelta):
            created_after = datetime.now(UTC) - created_after
        client = self._client
        channel = client._channel(await client._resolve_realtime_url())
        async for pb in subscribe_to_runs_with_tag(channel, client._metadata(), tag, created_after):
            yield Run.from_pb(pb)

    def subscribe_to_runs_with_tag_sync(self, tag: str, **kwargs: Any) -> Iterator[Run]:
        return self._client._iterate_sync(self.subscribe_to_runs_with_tag(tag, **kwargs))

    async def subscribe_to_batch(self, batch_id: str) -> AsyncIterator[Run]:
        """The runs of a batch, then every change of them, in order per run. Never ends by
        itself; reconnects transparently."""
        from runplane._realtime import subscribe_to_batch

        client = self._client
        channel = client._channel(await client._resolve_realtime_url())
        async for pb in subscribe_to_batch(channel, client._metadata(), batch_id):
            yield Run.from_pb(pb)

    def subscribe_to_batch_sync(self, batch_id: str) -> Iterator[Run]:
        return self._client._iterate_sync(self.subscribe_to_batch(batch_id))


class TagsAPI(Namespace):
    """Tags of the running run: ``await tags.add("user:42")`` inside a task."""

    async def add(self, tags: str | Sequence[str], *, run_id: str | None = None) -> Run:
        """Add tags to the run this code runs in (or ``run_id``); at most 10 per run."""
        if run_id is None:
            ctx = current_context()
            if ctx is None:
                raise ConfigurationError("tags.add outside a run needs run_id=")
            run_id = ctx.run.id
        client = self._client
        response = await client._call(
            client._run_stub().AddRunTags,
            rpb.AddRunTagsRequest(run_id=run_id, tags=[tags] if isinstance(tags, str) else tags),
        )
        return Run.from_pb(response.run)

    def add_sync(self, tags: str | Sequence[str], *, run_id: str | None = None) -> Run:
        return self._client._run_sync(self.add(tags, run_id=run_id))


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


tasks = TasksAPI(None)
runs = RunsAPI(None)
tags = TagsAPI(None)
auth = AuthAPI(None)
