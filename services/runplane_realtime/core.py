"""The realtime core that the gRPC servicer (``server.py``) and the HTTP endpoints (``http.py``)
share: check the caller's rights with the scheduler, then open a bounded feed of runs or chunks.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, TypeVar

from runplane.v1 import run_pb2
from runplane_common import errors
from runplane_common.auth import is_public_token
from runplane_common.config import RealtimeSettings
from runplane_common.grpcserver import bearer_token
from runplane_realtime.events import NatsLink
from runplane_realtime.fanout import Hubs, RunEvents
from runplane_realtime.feed import Feed, token_expiry_ms
from runplane_realtime.scheduler import Metadata, Scheduler
from runplane_realtime.streams import Chunk, RunStreams, stream_id
from runplane_realtime.subscriptions import (
    IdleChecks,
    RunSet,
    RunSetSubscription,
    RunSubscription,
    is_final,
)

T = TypeVar("T")

# A tag subscription covers runs created this long ago at most (RUN_EVENTS keeps 7 days).
DEFAULT_TAG_WINDOW_MS = 24 * 3600 * 1000
MAX_TAG_WINDOW_MS = 7 * 24 * 3600 * 1000
# An AppendStream caller's right to write a run's stream is checked with the scheduler at most
# this often: about as often as the scheduler re-reads a key, so a revoked key stops writing
# within seconds.
WRITE_GRANT_TTL = 2.0


class Realtime:
    """What the gRPC servicer and the HTTP endpoints share: authorisation, then an iterator.

    Each ``open_*`` method checks the caller's rights (and raises the ServiceError to answer)
    before returning the iterator, so a refused caller gets a status, never a stream."""

    def __init__(self, settings: RealtimeSettings, link: NatsLink, scheduler: Scheduler) -> None:
        self.settings = settings
        self.link = link
        self.scheduler = scheduler
        # One JetStream consumer per environment (and per read stream), shared by subscribers.
        self.hubs = Hubs(link)
        self.streams = RunStreams(link, settings, self.hubs)
        # The subscribers' feeds that still read events (for tests and introspection).
        self.feeds: set[Feed[Any]] = set()
        self._write_grants: dict[tuple[str, str], tuple[float, str]] = {}
        # The subscriptions' idle checks with the scheduler, kept within a rate.
        self.idle_checks = IdleChecks()
        # For the metrics, by kind (run, tag, batch, stream): subscribers open now, opened
        # ever, and cut off (fell behind, token expired).
        self.subscribers: Counter[str] = Counter()
        self.opened: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()

    async def open_run(
        self, credentials: Metadata, run_id: str, after_version: int, keep_open: bool
    ) -> Feed[run_pb2.Run]:
        if not run_id:
            raise errors.InvalidArgument("run_id", "must not be empty")
        if after_version < 0:
            raise errors.InvalidArgument("after_version", "must not be negative")
        # The authorisation check; the snapshot also names the run's environment, and so its
        # exact subject.
        current = await self.scheduler.get_run(run_id, credentials)
        subscription = RunSubscription(
            self.scheduler,
            self.link,
            RunEvents(self.hubs, current.environment_id, run_id=current.id),
            credentials,
            run_id,
            after_version,
            self.settings.reconcile_interval,
            self.idle_checks,
        )
        has_final = is_final(current) and current.version <= after_version
        runs = _empty() if has_final and not keep_open else subscription.runs(keep_open)

        def resume(last: run_pb2.Run | None) -> dict[str, str]:
            return {"after_version": str(last.version if last is not None else after_version)}

        return self._feed(credentials, runs, _run_size, resume, "run")

    def _feed(
        self,
        credentials: Metadata,
        source: AsyncGenerator[T, None],
        size: Callable[[T], int],
        resume: Callable[[T | None], dict[str, str]],
        kind: str,
    ) -> Feed[T]:
        """The subscriber's bounded buffer over ``source``, ending when its token expires;
        ``kind`` (run, tag, batch, stream) labels its metrics."""
        buffer, expires_at_ms = self.settings.subscriber_buffer, token_expiry_ms(credentials)
        feed = Feed(source, buffer, size, resume, expires_at_ms)
        self.feeds.add(feed)
        self.subscribers[kind] += 1
        self.opened[kind] += 1

        def stopped() -> None:
            self.feeds.discard(feed)
            self.subscribers[kind] -= 1
            if feed.cut_off.is_set():
                self.dropped[kind] += 1

        feed.when_stopped(stopped)
        return feed

    async def open_tag(
        self,
        credentials: Metadata,
        tag: str,
        created_after_ms: int | None,
        after_versions: Mapping[str, int],
        resume_cursor: int = 0,
    ) -> Feed[tuple[run_pb2.Run, int]]:
        if not tag:
            raise errors.InvalidArgument("tag", "must not be empty")
        now = int(time.time() * 1000)
        if created_after_ms is None:
            created_after_ms = now - DEFAULT_TAG_WINDOW_MS
        if created_after_ms < now - MAX_TAG_WINDOW_MS:
            raise errors.InvalidArgument("created_after", "at most 7 days back")
        return await self._open_set(
            credentials,
            RunSet.with_tag(tag, created_after_ms),
            after_versions,
            resume_cursor,
            "tag",
            "tag",
        )

    async def open_batch(
        self,
        credentials: Metadata,
        batch_id: str,
        after_versions: Mapping[str, int],
        resume_cursor: int = 0,
    ) -> Feed[tuple[run_pb2.Run, int]]:
        if not batch_id:
            raise errors.InvalidArgument("batch_id", "must not be empty")
        _check_resume(after_versions, resume_cursor)
        # A batch that is not the caller's (or no batch at all) is NOT_FOUND, as for GetBatch,
        # not a subscription that never sends anything.
        await self.scheduler.get_batch(batch_id, credentials)
        return await self._open_set(
            credentials,
            RunSet.of_batch(batch_id),
            after_versions,
            resume_cursor,
            "batch_id",
            "batch",
        )

    async def _open_set(
        self,
        credentials: Metadata,
        runs: RunSet,
        after_versions: Mapping[str, int],
        resume_cursor: int,
        field: str,
        kind: str,
    ) -> Feed[tuple[run_pb2.Run, int]]:
        """``field`` names the request's tag or batch, which the scheduler checks as a filter;
        ``kind`` labels the subscriber's metrics."""
        _check_resume(after_versions, resume_cursor)
        environment_id = await self.scheduler.environment_id(credentials)
        # The authorisation check: a public token must be allowed the tag or batch.
        try:
            await self.scheduler.list_runs(
                credentials, tags=runs.tags, batch_id=runs.batch_id, first_page_of=1
            )
        except errors.InvalidArgument as error:  # it names its own field (tags[0])
            raise errors.InvalidArgument(field, error.problem) from None
        subscription = RunSetSubscription(
            self.scheduler,
            self.link,
            self.hubs,
            credentials,
            environment_id,
            runs,
            dict(after_versions),
            self.settings.reconcile_interval,
            resume_cursor,
            self.idle_checks,
        )

        def resume(last: tuple[run_pb2.Run, int] | None) -> dict[str, str]:
            # The SDK also sends the versions it has; an SSE client its Last-Event-ID.
            cursor = last[1] if last is not None and last[1] else resume_cursor
            return {"resume_cursor": str(cursor)}

        return self._feed(credentials, subscription.runs(), _set_size, resume, kind)

    async def open_stream(
        self, credentials: Metadata, run_id: str, sid: str, after_index: int
    ) -> Feed[list[Chunk]]:
        if not run_id:
            raise errors.InvalidArgument("run_id", "must not be empty")
        stream_id(sid)
        if after_index < 0:
            raise errors.InvalidArgument("after_index", "must not be negative")
        run = await self.scheduler.get_run(run_id, credentials)

        async def run_is_final() -> bool:
            try:
                return is_final(await self.scheduler.get_run(run_id, credentials))
            except errors.Unavailable:
                return False

        chunks = self.streams.read(
            run.environment_id, run.id, sid, after_index, run_is_final, finished=is_final(run)
        )

        def resume(last: list[Chunk] | None) -> dict[str, str]:
            return {"after_index": str(last[-1].index if last else after_index)}

        return self._feed(credentials, chunks, _chunk_size, resume, "stream")

    async def append(
        self,
        credentials: Metadata,
        run_id: str,
        sid: str,
        chunks: list[str],
        close: bool,
        chunk_ids: list[str],
    ) -> int:
        if not run_id:
            raise errors.InvalidArgument("run_id", "must not be empty")
        stream_id(sid)
        token = bearer_token(credentials)
        if is_public_token(token):
            raise errors.PermissionDenied("writing a stream needs a secret key")
        environment_id = await self._write_grant(credentials, token, run_id)
        return await self.streams.append(environment_id, run_id, sid, chunks, close, chunk_ids)

    async def _write_grant(self, credentials: Metadata, token: str, run_id: str) -> str:
        """The run's environment if the secret key may write to it (cached briefly)."""
        key = (token, run_id)
        now = time.monotonic()
        grant = self._write_grants.get(key)
        if grant is not None and grant[0] > now:
            return grant[1]
        run = await self.scheduler.get_run(run_id, credentials)
        if len(self._write_grants) > 10_000:
            self._write_grants.clear()
        self._write_grants[key] = (now + WRITE_GRANT_TTL, run.environment_id)
        return run.environment_id


def _check_resume(after_versions: Mapping[str, int], resume_cursor: int) -> None:
    if resume_cursor < 0:
        raise errors.InvalidArgument("resume_cursor", "must not be negative")
    for run_id, version in after_versions.items():
        if version < 0:
            raise errors.InvalidArgument(f"after_versions[{run_id[:80]}]", "must not be negative")


def _run_size(run: run_pb2.Run) -> int:
    return int(run.ByteSize())


def _set_size(item: tuple[run_pb2.Run, int]) -> int:
    return int(item[0].ByteSize())


def _chunk_size(chunks: list[Chunk]) -> int:
    return sum(len(chunk.data) for chunk in chunks)


async def _empty() -> AsyncGenerator[run_pb2.Run, None]:
    return
    yield  # an async generator that yields nothing
