"""Waitpoints: the one mechanism behind every block of a run (a duration, a token, child runs).

A run blocked on a pending waitpoint is WAITING and holds no concurrency slot; its attempt stays
suspended in the executor that ran it. When no waitpoint of the run is pending any more, the run
queues for a slot again (ahead by its original queued time) and, once it has one, goes back to
EXECUTING: the holding executor gets a ``Resume``, or, if that executor is gone, the run gets a
fresh attempt that replays the task from the top against the journal.

The journal is the ``waitpoints`` rows keyed by (run, seq): a wait request whose seq is already
there gets the recorded waitpoint back, so a replay re-waits nothing that completed and triggers
no child twice.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson
from opentelemetry import context as otel_context

from runplane_common import telemetry
from runplane_common.errors import InvalidArgument, NotFound, ServiceError
from runplane_common.ids import new_id, random_id
from runplane_scheduler.dispatch import ExecutorState, Lease, QueueKey
from runplane_scheduler.engine.attempts import Attempts, attempt_row
from runplane_scheduler.engine.resources import EngineResources, unlist
from runplane_scheduler.engine.timers import TimerKind, Timers
from runplane_scheduler.engine.triggering import Triggering
from runplane_scheduler.specs import TriggerSpec
from runplane_scheduler.states import FINAL, Status
from runplane_scheduler.store import RunRow, Store, Tx
from runplane_scheduler.store import runs as stored_runs
from runplane_scheduler.store import waitpoints as stored
from runplane_scheduler.store.waitpoints import COMPLETED, PENDING
from runplane_scheduler.worker_messages import (
    CancelAttempt,
    Resume,
    RunError,
    WaitRequest,
    WaitResult,
)

log = logging.getLogger("runplane.scheduler.waits")

TIMEOUT_ERROR = "WaitpointTimeoutError"
# Runs looked up per statement when a token's completion resumes them.
RESUME_CHUNK = 500


@dataclass(frozen=True)
class Suspended:
    """A WAITING run's attempt, suspended in the executor that ran it."""

    attempt_id: str
    executor_id: str
    environment_id: str


def wait_result(seq: int, m: Mapping[Any, Any]) -> WaitResult:
    """A completed waitpoint row as its wait's result."""
    error = None
    if m["error"]:
        e = orjson.loads(m["error"])
        error = RunError(
            type=e.get("type", ""),
            message=e.get("message", ""),
            stack_trace=e.get("stack_trace", ""),
        )
    return WaitResult(seq=seq, ok=bool(m["ok"]), output=m["output"] or "null", error=error)


def _error(type_: str, message: str) -> str:
    return orjson.dumps({"type": type_, "message": message, "stack_trace": ""}).decode()


class Waitpoints:
    """Waitpoint logic the engine calls; it owns the WAITING runs' suspended attempts."""

    def __init__(
        self,
        resources: EngineResources,
        timers: Timers,
        attempts: Attempts,
        triggering: Triggering,
    ) -> None:
        self.resources = resources
        self.timers = timers
        self.attempts = attempts
        self.triggering = triggering
        self.suspended: dict[str, Suspended] = {}  # run id -> its suspended attempt
        self.by_attempt: dict[str, str] = {}  # suspended attempt id -> run id
        self.resuming: set[str] = set()  # WAITING runs queued for a slot to resume
        # When each of them was queued (ms): a replay's queue span starts there, not at the
        # run's queued_at, which keeps its first place in the queue.
        self.resume_queued_at: dict[str, int] = {}
        # Runs ready to resume whose version no connected executor runs: PENDING_VERSION (with
        # parked_from WAITING) until one registers, by (environment id, task id, version).
        self.parked: dict[tuple[str, str, str], list[str]] = {}
        # Runs a pending wait waits on (a superset: an entry goes after its run's end commits),
        # so the end of any other run needs no lookup.
        self.awaited: set[str] = set()

    # -- loading ---------------------------------------------------------------------------------

    async def load(self) -> None:
        """After a scheduler restart: remember the WAITING runs, and queue those whose
        waitpoints all completed while the scheduler was down (or before it resumed them)."""
        rows, self.awaited, pending = await stored.load_waiting(self.resources.store.db)
        for row in rows:
            m = row._mapping
            if m["current_attempt_id"]:
                self._suspend(
                    m["id"], m["current_attempt_id"], m["executor_id"] or "", m["environment_id"]
                )
            if (m["id"], m["attempt_count"]) not in pending:
                # Executors reconnect after a restart: not parked for the lack of one yet.
                self._queue_resume(m, live=False)

    # -- wait requests from executors ---------------------------------------------------------

    def on_wait(self, ex: ExecutorState, req: WaitRequest) -> None:
        lease = self.resources.index.leases.get(req.attempt_id)
        run_id = lease.run_id if lease is not None else self.by_attempt.get(req.attempt_id)
        if run_id is None:
            log.warning("wait request of unknown attempt %s ignored", req.attempt_id)
            return
        self.resources.background.spawn(self._wait(ex, run_id, req))

    async def _wait(self, ex: ExecutorState, run_id: str, req: WaitRequest) -> None:
        env = ex.environment_id
        children: list[str] = []
        error = ""
        # The attempt's number, fixed when it was made (a replay keeps the lost one's).
        attempt, journaled = await stored.attempt_and_journaled(
            self.resources.store.db, req.attempt_id, run_id, req.seq
        )
        if attempt is None:
            return
        if req.children is not None and not journaled:
            try:
                children = await self._trigger_children(env, run_id, attempt, req)
            except ServiceError as e:
                error = _error(type(e).__name__, str(e))

        async def op(tx: Tx) -> None:
            status = await stored_runs.status_with_attempt(tx, run_id, req.attempt_id)
            if status is None:
                return  # the attempt is no longer the run's (cancelled, lapsed)
            row = await stored.journaled(tx, run_id, attempt, req.seq)
            m = (
                row._mapping
                if row is not None
                else await self._journal(tx, env, run_id, attempt, req, children, error)
            )
            if m["status"] == COMPLETED:
                if status == Status.EXECUTING.value:
                    result = wait_result(req.seq, m)
                    tx.after_commit.append(lambda: self._send_resume(ex, req.attempt_id, [result]))
                return
            moved = await tx.transition(
                run_id,
                [Status.EXECUTING],
                Status.WAITING,
                "waiting",
                stored_runs.attempt_is(req.attempt_id),
                updated_at=self.resources.clock.now_ms(),
            )
            if moved is not None:
                tx.after_commit.append(lambda: self._suspend_leased(run_id, req.attempt_id, ex))

        # Through the ordered report queue: after the attempt's "started" sent before it.
        self.resources.background.submit(op)

    async def _trigger_children(
        self, env: str, run_id: str, attempt: int, req: WaitRequest
    ) -> list[str]:
        """Trigger the wait's child runs (ids in item order) as a batch whose idempotency key
        is the journal slot: a replay asking again finds the same batch, so no child runs
        twice. (A retry is another attempt: a new slot, new children, as in the reference.)"""
        if req.children is None:
            return []
        if req.children.invalid is not None:
            raise req.children.invalid  # the first bad item, checked where the request came in
        specs: list[TriggerSpec] = [
            replace(spec, parent_run_id=run_id) for spec in req.children.specs
        ]
        if not specs:
            raise InvalidArgument("items", "a batch needs at least one item")
        # The children join the parent's trace under its wait span (this task is the wait's own).
        token = (
            otel_context.attach(telemetry.context_from_traceparent(req.traceparent))
            if req.traceparent
            else None
        )
        try:
            _, rows, _ = await self.triggering.batch_trigger(
                env, specs, idempotency_key=f"wait/{run_id}/{attempt}/{req.seq}"
            )
        finally:
            if token is not None:
                otel_context.detach(token)
        return [r["id"] for r in rows]

    async def _journal(
        self,
        tx: Tx,
        env: str,
        run_id: str,
        attempt: int,
        req: WaitRequest,
        children: list[str],
        error: str,
    ) -> dict[str, Any]:
        """The journal row of a new wait, completed at once when what it waits on already is."""
        ts = self.resources.clock.now_ms()
        row: dict[str, Any] = {
            "id": new_id("waitpoint"),
            "environment_id": env,
            "kind": "DURATION",
            "status": PENDING,
            "run_id": run_id,
            "attempt": attempt,
            "seq": req.seq,
            "target": None,
            "ok": None,
            "output": None,
            "error": None,
            "due_at": None,
            "idempotency_key": None,
            "idempotency_key_expires_at": None,
            "tags": "[]",
            "secret": None,
            "created_at": ts,
            "completed_at": None,
        }
        done: dict[str, Any] | None = None
        if error:
            done = {"ok": False, "output": None, "error": error}
        elif req.duration_ms is not None or req.until_ms is not None:
            due = ts + req.duration_ms if req.duration_ms is not None else req.until_ms or 0
            if len(req.idempotency_key) > self.resources.settings.limits.idempotency_key_length:
                done = {
                    "ok": False,
                    "output": None,
                    "error": _error("InvalidArgumentError", "the idempotency key is too long"),
                }
            elif req.idempotency_key:
                due = await self._keyed_due(tx, env, req, due, ts, row)
            row["due_at"] = due
            if done is None and due <= ts:
                done = {"ok": True, "output": "null", "error": None}
        elif req.token_id is not None:
            row.update(kind="TOKEN", target=req.token_id)
            token = await stored.token_in(tx, env, req.token_id)
            if token is None:
                done = {
                    "ok": False,
                    "output": None,
                    "error": _error("NotFoundError", f"token {req.token_id} not found"),
                }
            elif token.status == COMPLETED:
                done = {"ok": token.ok, "output": token.output, "error": token.error}
        elif req.children is not None:
            row["kind"] = "BATCH"
            self.awaited.update(children)
            stored.add_children(tx, row["id"], children)
            results = await self._children_results(tx, row["id"])
            if results is not None:
                done = {"ok": True, "output": results, "error": None}
        else:
            raise InvalidArgument("wait", "a wait request needs what to wait on")
        if done is not None:
            row.update(status=COMPLETED, completed_at=ts, **done)
        await stored.insert_waitpoint(tx, row)
        if row["status"] == PENDING and row["due_at"] is not None:
            await self.timers.schedule(tx, row["due_at"], TimerKind.WAITPOINT, row["id"])
        return row

    @staticmethod
    async def _keyed_due(
        tx: Tx, env: str, req: WaitRequest, due: int, ts: int, row: dict[str, Any]
    ) -> int:
        """A keyed wait ends when the first wait with its key (not expired) ends."""
        first = await stored.first_keyed_due(tx, env, req.idempotency_key, ts)
        row["idempotency_key"] = req.idempotency_key
        row["idempotency_key_expires_at"] = ts + (req.idempotency_key_ttl_ms or 30 * 86_400_000)
        return first if first is not None else due

    # -- completion --------------------------------------------------------------------------------

    async def timer_due(self, tx: Tx, waitpoint_id: str, ts: int) -> None:
        """A duration ended, or a token timed out."""
        kind = await stored.kind_of(tx, waitpoint_id)
        if kind is None:
            return
        if kind == "TOKEN":
            error = _error(TIMEOUT_ERROR, "the wait token timed out before it was completed")
            await self.complete(tx, waitpoint_id, ok=False, output=None, error=error)
        else:
            await self.complete(tx, waitpoint_id, ok=True, output="null", error=None)

    async def complete(
        self, tx: Tx, waitpoint_id: str, *, ok: bool, output: str | None, error: str | None
    ) -> RunRow | None:
        """Complete a pending waitpoint (a token: with the runs' waits on it); a run left with
        no pending waitpoint queues to resume. None when it was not pending."""
        done = await stored.complete(
            tx, waitpoint_id, ok, output, error, self.resources.clock.now_ms()
        )
        if done is None:
            return None
        if done.run_id is None:
            await self._complete_waits_on(tx, done.id, ok=ok, output=output, error=error)
        else:
            await self._maybe_resume(tx, done.run_id)
        return done

    async def _complete_waits_on(
        self, tx: Tx, token_id: str, *, ok: bool, output: str | None, error: str | None
    ) -> None:
        """Complete every run's wait on a token, and queue the runs left with nothing to wait
        for: a few statements however many runs wait (10,000 waiting on one token is fine)."""
        run_ids = await stored.complete_waits_on(
            tx, token_id, ok, output, error, self.resources.clock.now_ms()
        )
        for start in range(0, len(run_ids), RESUME_CHUNK):
            ready = await stored.ready_to_resume(tx, run_ids[start : start + RESUME_CHUNK])
            tx.after_commit.append(functools.partial(self._queue_resumes, ready))

    def _queue_resumes(self, runs: Sequence[RunRow]) -> None:
        for run in runs:
            self._queue_resume(run._mapping)

    async def _maybe_resume(self, tx: Tx, run_id: str) -> None:
        run = await stored_runs.get(tx, run_id)
        if run is None or run.status != Status.WAITING.value:
            return
        if not await stored.pending_count(tx, run_id, run.attempt_count):
            m = run._mapping
            tx.after_commit.append(lambda: self._queue_resume(m))

    async def run_finished(self, tx: Tx, row: Mapping[Any, Any]) -> None:
        """A run reached a final status: a wait on child runs may be complete now."""
        run_id = row["id"]
        if run_id not in self.awaited:
            return
        tx.after_commit.append(lambda: self.awaited.discard(run_id))
        for waitpoint_id in await stored.pending_waits_on_child(tx, run_id):
            results = await self._children_results(tx, waitpoint_id)
            if results is not None:
                await self.complete(tx, waitpoint_id, ok=True, output=results, error=None)

    @staticmethod
    async def _children_results(tx: Tx, waitpoint_id: str) -> str | None:
        """JSON list of the children's results in item order, or None while one runs."""
        runs = await stored.children_of(tx, waitpoint_id)
        if not runs or any(Status(r.status) not in FINAL for r in runs):
            return None
        items = []
        for r in runs:
            ok = r.status == Status.COMPLETED.value
            items.append(
                {
                    "id": r.id,
                    "ok": ok,
                    "output": orjson.loads(r.output) if ok and r.output else None,
                    "error": None if ok else orjson.loads(r.error or "null"),
                    "status": r.status,
                }
            )
        return orjson.dumps(items).decode()

    # -- suspend and resume -----------------------------------------------------------------------

    def _suspend(self, run_id: str, attempt_id: str, executor_id: str, environment_id: str) -> None:
        self.suspended[run_id] = Suspended(attempt_id, executor_id, environment_id)
        self.by_attempt[attempt_id] = run_id

    def _suspend_leased(self, run_id: str, attempt_id: str, ex: ExecutorState) -> None:
        """The run went WAITING: its slot is free while the attempt stays with ``ex``."""
        self._suspend(run_id, attempt_id, ex.executor_id, ex.environment_id)
        self.resources.release(attempt_id)

    def attempt_ended(self, attempt_id: str) -> None:
        """A WAITING run's suspended attempt ended anyway (its task process died, or it
        finished without awaiting its wait): the run will resume by replay."""
        run_id = self.by_attempt.get(attempt_id)
        if run_id is not None:
            held = self.suspended[run_id]
            self.suspended[run_id] = Suspended(attempt_id, "", held.environment_id)

    def _held(self, attempt_id: str) -> Suspended | None:
        run_id = self.by_attempt.get(attempt_id)
        return None if run_id is None else self.suspended.get(run_id)

    def held_by(self, attempt_id: str, ex: ExecutorState) -> bool:
        """The suspended attempt waits in ``ex``."""
        held = self._held(attempt_id)
        return (
            held is not None
            and held.executor_id == ex.executor_id
            and held.environment_id == ex.environment_id
        )

    def held_by_anyone(self, attempt_id: str) -> bool:
        held = self._held(attempt_id)
        return held is not None and bool(held.executor_id)

    def held_in_other_environment(self, executor_id: str, environment_id: str) -> bool:
        """A suspended attempt of another environment waits in an executor of this id."""
        return any(
            h.executor_id == executor_id and h.environment_id != environment_id
            for h in self.suspended.values()
        )

    def registered(self, ex: ExecutorState, running: set[str]) -> None:
        """An executor (re)connected: attempts it still runs that are neither leased nor
        suspended belong to nobody any more (their run was cancelled, or resumed by replay
        elsewhere while this executor was away). Stop them."""
        for attempt_id in running:
            if attempt_id in self.resources.index.leases or attempt_id in self.by_attempt:
                continue
            ex.outbox.put_nowait(CancelAttempt(attempt_id=attempt_id))

    def forget(self, run_id: str) -> Suspended | None:
        held = self.suspended.pop(run_id, None)
        if held is not None:
            self.by_attempt.pop(held.attempt_id, None)
        self.resuming.discard(run_id)
        self.resume_queued_at.pop(run_id, None)
        return held

    def cancelled(self, run_id: str) -> bool:
        """A run without a leased attempt was cancelled: stop its suspended attempt, if a WAITING
        run has one. True when an attempt was told (its on_cancel hooks run there)."""
        held = self.forget(run_id)
        self.resources.index.discard(run_id)
        if held is None:
            return False
        ex = self.resources.index.executors.get(held.executor_id)
        if ex is None or not ex.connected:
            return False
        ex.outbox.put_nowait(CancelAttempt(attempt_id=held.attempt_id, run_id=run_id))
        return True

    def _queue_resume(self, m: Mapping[Any, Any], live: bool = True) -> None:
        """Queue the run for a slot, ahead by its original queued time; or, when no executor of
        its version is connected, park it in PENDING_VERSION until one is (the run is not
        replayed on other code)."""
        if m["id"] in self.resuming:
            return
        version = m.get("worker_version") or ""
        env, task_id = m["environment_id"], m["task_id"]
        if live and version and not self.resources.index.provides(env, task_id, version):
            self.resources.background.spawn(self._park(m["id"], (env, task_id, version)))
            return
        self.resuming.add(m["id"])
        self.resume_queued_at[m["id"]] = self.resources.clock.now_ms()
        self.resources.index.removed.discard(m["id"])
        self.resources.enqueue(m, m["queued_at"] or m["created_at"])

    def strand(self, run_id: str, environment_id: str, task_id: str, version: str) -> None:
        """A run queued to resume reached the head of its queue with no executor of its
        version connected: park it (the dispatch index has already set it aside)."""
        self.resuming.discard(run_id)
        self.resources.background.spawn(self._park(run_id, (environment_id, task_id, version)))

    async def _park(self, run_id: str, key: tuple[str, str, str]) -> None:
        try:
            row = await self.resources.park(run_id, Status.WAITING)
        except Exception:
            log.exception("parking %s for version %s failed", run_id, key[2])
            return
        if row is not None:
            log.info("run %s waits for an executor of version %s", run_id, key[2])
            self.parked.setdefault(key, []).append(run_id)
            self.provided(key[0], [key[1]])  # one may have registered meanwhile

    def migrated(self, m: Mapping[Any, Any]) -> None:
        """An operator moved a parked run to another version (it is WAITING again): it queues
        to resume there, by replay from its journal, or parks again under the new version."""
        unlist(self.parked, m["id"])
        self._queue_resume(m)

    def restore_parked(self, m: Mapping[Any, Any]) -> None:
        """After a restart: a run that waits for an executor of its version to resume."""
        if m["current_attempt_id"]:
            self._suspend(
                m["id"], m["current_attempt_id"], m["executor_id"] or "", m["environment_id"]
            )
        key = (m["environment_id"], m["task_id"], m["worker_version"] or "")
        self.parked.setdefault(key, []).append(m["id"])

    def provided(self, environment_id: str, task_ids: list[str]) -> None:
        """Executors of these tasks registered: parked runs of a version now provided go back
        to WAITING and queue to resume (by replay, or where their attempt still waits)."""
        wanted = set(task_ids)
        index = self.resources.index
        for key in list(self.parked):
            env, task_id, _ = key
            if env == environment_id and task_id in wanted and index.provides(*key):
                for run_id in self.parked.pop(key):
                    self.resources.background.spawn(self._unpark(run_id))

    async def _unpark(self, run_id: str) -> None:
        async def op(tx: Tx) -> RunRow | None:
            return await tx.transition(
                run_id,
                [Status.PENDING_VERSION],
                Status.WAITING,
                "resuming",
                parked_from=None,
                updated_at=self.resources.clock.now_ms(),
            )

        try:
            row = await self.resources.store.writer.run(op)
        except Exception:
            log.exception("releasing %s from PENDING_VERSION failed", run_id)
            return
        if row is not None:
            self._queue_resume(row._mapping)

    async def resume(self, run_id: str, key: QueueKey, ex: ExecutorState) -> None:
        """The WAITING run has a slot (reserved on ``ex``): resume its suspended attempt on the
        executor holding it, or replay it in a fresh attempt on ``ex``."""
        self.resuming.discard(run_id)
        queued_at = self.resume_queued_at.pop(run_id, None)
        held = self.suspended.get(run_id)
        holder = self.resources.index.executors.get(held.executor_id) if held else None
        if (
            held is not None
            and holder is not None
            and holder.connected
            and holder.environment_id == held.environment_id
        ):
            await self._resume_held(run_id, held, holder, key, ex)
        else:
            self.forget(run_id)
            await self._replay(run_id, held, key, ex, queued_at)

    async def _resume_held(
        self, run_id: str, held: Suspended, holder: ExecutorState, key: QueueKey, ex: ExecutorState
    ) -> None:
        async def op(tx: Tx) -> list[WaitResult] | None:
            row = await tx.transition(
                run_id,
                [Status.WAITING],
                Status.EXECUTING,
                "resumed",
                stored_runs.attempt_is(held.attempt_id),
                updated_at=self.resources.clock.now_ms(),
            )
            if row is None:
                return None
            return await self._results(tx, row)

        results = await self._run_or_unreserve(op, run_id, key, ex)
        # Suspended until now: an executor reconnecting meanwhile keeps the attempt.
        current = self.forget(run_id)
        if results is None:
            return
        lease = Lease(
            held.attempt_id,
            run_id,
            key,
            holder.executor_id,
            self.resources.clock.monotonic(),
            True,
            True,
        )
        # The slot reserved on ``ex`` becomes the lease of the attempt waiting in ``holder``.
        self.resources.index.lease(lease, ex, holder)
        if current is None or current.executor_id != holder.executor_id:
            # The attempt ended while the resume was being committed: run it again.
            self.attempts.requeue_lost(lease)
            return
        self._send_resume(holder, held.attempt_id, results)

    async def _replay(
        self,
        run_id: str,
        held: Suspended | None,
        key: QueueKey,
        ex: ExecutorState,
        queued_at: int | None = None,
    ) -> None:
        """A fresh attempt that runs the task from the top; its waits find the journal. It
        takes the lost attempt's number: a replay is not a retry."""
        attempt_id = random_id("attempt")

        async def op(tx: Tx) -> RunRow | None:
            ts = self.resources.clock.now_ms()
            row = await tx.transition(
                run_id,
                [Status.WAITING],
                Status.DEQUEUED,
                "dequeued",
                current_attempt_id=attempt_id,
                executor_id=ex.executor_id,
                attempt_count=stored_runs.attempt_count_minus(1),
                updated_at=ts,
            )
            if row is None:
                return None
            if held is not None:
                await Store.finish_attempt(tx, held.attempt_id, "LOST")
            number = row._mapping["attempt_count"] + 1
            await Store.insert_attempt(tx, attempt_row(attempt_id, run_id, number, ex, ts))
            return row

        row = await self._run_or_unreserve(op, run_id, key, ex)
        if row is not None:
            log.info("run %s resumes by replay on executor %s", run_id, ex.executor_id)
            self.attempts.assign(dict(row._mapping), attempt_id, key, ex, queued_at)

    async def _run_or_unreserve(
        self, op: Any, run_id: str, key: QueueKey, ex: ExecutorState
    ) -> Any:
        try:
            result = await self.resources.store.writer.run(op)
        except Exception:
            log.exception("resume of %s failed", run_id)
            result = None
        if result is None:
            self.resources.index.unreserve(run_id, key, ex)
            self.resources.dispatch_wake.set()
        return result

    @staticmethod
    async def _results(tx: Tx, run: RunRow) -> list[WaitResult]:
        """The completed waits of the run's current attempt."""
        rows = await stored.completed_of(tx, run.id, run.attempt_count)
        return [wait_result(r.seq, r._mapping) for r in rows]

    @staticmethod
    def _send_resume(ex: ExecutorState, attempt_id: str, results: list[WaitResult]) -> None:
        if ex.connected:
            ex.outbox.put_nowait(Resume(attempt_id=attempt_id, results=tuple(results)))

    # -- tokens ------------------------------------------------------------------------------------

    async def create_token(
        self,
        env: str,
        *,
        timeout_ms: int,
        idempotency_key: str,
        idempotency_key_ttl_ms: int,
        tags: list[str],
    ) -> tuple[Mapping[Any, Any], bool]:
        async def op(tx: Tx) -> tuple[Mapping[Any, Any], bool]:
            ts = self.resources.clock.now_ms()
            if idempotency_key:
                found = await stored.token_by_key(tx, env, idempotency_key, ts)
                if found is not None:
                    return found._mapping, True
            row: dict[str, Any] = {
                "id": new_id("waitpoint"),
                "environment_id": env,
                "kind": "TOKEN",
                "status": PENDING,
                "run_id": None,
                "seq": None,
                "target": None,
                "ok": None,
                "output": None,
                "error": None,
                "due_at": ts + timeout_ms if timeout_ms else None,
                "idempotency_key": idempotency_key or None,
                "idempotency_key_expires_at": ts + (idempotency_key_ttl_ms or 30 * 86_400_000)
                if idempotency_key
                else None,
                "tags": orjson.dumps(tags).decode(),
                "secret": secrets.token_urlsafe(24),
                "created_at": ts,
                "completed_at": None,
            }
            await stored.insert_waitpoint(tx, row)
            if row["due_at"] is not None:
                await self.timers.schedule(tx, row["due_at"], TimerKind.WAITPOINT, row["id"])
            return row, False

        return await self.resources.store.writer.run(op)

    async def complete_token(
        self, token_id: str, data: str, *, env: str = "", secret: str = ""
    ) -> Mapping[Any, Any]:
        """Complete a token with ``data`` (JSON text), authorised by its environment or by the
        secret of its URL. Completing a completed token changes nothing."""

        async def op(tx: Tx) -> Mapping[Any, Any]:
            token = await stored.token(tx, token_id)
            allowed = token is not None and token.run_id is None
            if allowed and env:
                allowed = token is not None and token.environment_id == env
            elif allowed:
                allowed = token is not None and secrets.compare_digest(token.secret or "", secret)
            if token is None or not allowed:
                raise NotFound(f"token {token_id} not found")
            done = await self.complete(tx, token_id, ok=True, output=data, error=None)
            return token._mapping if done is None else done._mapping

        return await self.resources.store.writer.run(op)

    async def get_token(self, env: str, token_id: str) -> Mapping[Any, Any]:
        row = await stored.get_token(self.resources.store.db, env, token_id)
        if row is None:
            raise NotFound(f"token {token_id} not found")
        return row._mapping

    async def list_tokens(
        self,
        env: str,
        *,
        statuses: list[str],
        tags: list[str],
        idempotency_key: str,
        after: str | None,
        limit: int,
    ) -> list[Mapping[Any, Any]]:
        """Tokens newest first; ``statuses`` in WAITING | COMPLETED | TIMED_OUT."""
        rows = await stored.list_tokens(self.resources.store.db, env, idempotency_key, after)
        out: list[Mapping[Any, Any]] = []
        for r in rows:
            m = r._mapping
            if statuses and token_status(m) not in statuses:
                continue
            if tags and not set(tags) & set(orjson.loads(m["tags"])):
                continue
            out.append(m)
            if len(out) >= limit:
                break
        return out


def token_status(m: Mapping[Any, Any]) -> str:
    if m["status"] == PENDING:
        return "WAITING"
    if not m["ok"] and m["error"] and orjson.loads(m["error"]).get("type") == TIMEOUT_ERROR:
        return "TIMED_OUT"
    return "COMPLETED"
