"""A warm pool of task processes, owned by the executor's control loop.

Attempts of tasks that keep the default machine share the warm processes (the fast path: no
process start per attempt). An attempt with an explicit machine (the task's ``machine=`` or the
trigger's) runs in a process of its own started for it, whose data segment is capped at the
machine's memory (see ``runplane.worker.main``): an allocation past it raises MemoryError in that
attempt only, reported as out-of-memory; a process killed from outside (the kernel's OOM killer)
is reported the same way. Neighbours are never affected.

An attempt that must be stopped hard (cancelled, or past its max_duration, and still running
after the grace period, e.g. a CPU-bound loop that never yields) is stopped by killing its
process; the other attempts of that process are reported lost (run again without counting
against their retries) and the process is replaced. max_duration is timed here, from the
attempt's start: at the limit the process is told (``ctx.signal`` fires with reason "timeout"
and the attempt is cancelled), after the grace the process is killed.

Waiting attempts are evicted by the policy of :class:`~runplane_executor.waits.ResidentWaits`
(``max_resident_waits``, ``evict_waits_after``): the process drops the attempt's coroutine
(``cleanup`` hooks run, no other hook) and reports it lost; the scheduler keeps the run WAITING
and, once its waits complete, replays it from its journal on any executor, with the same attempt
number. The replayed attempt's max_duration clock starts afresh: it counts that execution, which
runs the code before the wait again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from runplane import worker
from runplane.worker import (
    Attempt,
    AttemptResult,
    Cancel,
    CancelHooks,
    Evict,
    Failed,
    FromProcess,
    Kind,
    Logs,
    Metadata,
    Ready,
    Report,
    Result,
    Resume,
    Run,
    Started,
    Stop,
    Timeout,
    ToProcess,
    Wait,
    WaitResult,
)
from runplane_executor.waits import ResidentWaits

log = logging.getLogger("runplane.executor.pool")

# Hears every report about an attempt: the task processes', and the pool's own results of
# attempts it lost or killed.
EventSink = Callable[[Report], None]


@dataclass
class _Proc:
    index: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    attempts: set[str] = field(default_factory=set)
    ready: asyncio.Future[list[str]] | None = None
    dead: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Started for one attempt with a machine's memory limit; stopped after it.
    dedicated: bool = False

    def send(self, message: ToProcess) -> None:
        with self.lock:
            self.conn.send(message)


class ProcessPool:
    def __init__(
        self,
        modules: list[str],
        size: int,
        sink: EventSink,
        cancel_grace: float = 3.0,
        max_resident_waits: int = 0,
        evict_waits_after: float = 0.0,
        output_limit: int = worker.DEFAULT_OUTPUT_LIMIT,
    ) -> None:
        self.modules = modules
        self.output_limit = output_limit
        self.size = max(1, size)
        self.sink = sink
        self.cancel_grace = cancel_grace
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list[_Proc] = []
        self._where: dict[str, _Proc] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._kills: set[asyncio.Task[None]] = set()
        self._attempts: dict[str, Attempt] = {}
        self._timeouts: dict[str, asyncio.Task[None]] = {}
        # max_duration counts execution only: a waiting attempt's clock is stopped with the
        # time it has left (attempt id -> (seconds left, loop time the clock last started)).
        self._clocks: dict[str, tuple[float, float]] = {}
        self.task_ids: list[str] = []
        # Waiting attempts kept in memory, and those told to go (their "lost" result follows).
        self.waits = ResidentWaits(max_resident_waits, evict_waits_after)
        self._evicting: set[str] = set()
        # Attempts paused at a wait and not handed a resume since: their state is in the
        # scheduler's journal, so a process dying under one loses it rather than failing it.
        self._paused: set[str] = set()
        self._check: asyncio.TimerHandle | None = None
        self._check_at = 0.0

    async def start(self) -> list[str]:
        """Start the processes; returns the task ids they provide."""
        self._loop = asyncio.get_running_loop()
        procs = [self._spawn(i) for i in range(self.size)]
        results = await asyncio.gather(*(p.ready for p in procs if p.ready is not None))
        self.task_ids = results[0]
        return self.task_ids

    def _spawn(self, index: int, memory_limit: int = 0) -> _Proc:
        """Start a task process; index -1: a dedicated one, outside the warm pool."""
        assert self._loop is not None
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker.main,
            args=(child, self.modules, memory_limit, self.output_limit),
            name=f"runplane-task-{index}" if index >= 0 else "runplane-task-dedicated",
            daemon=True,
        )
        process.start()
        child.close()
        proc = _Proc(
            index=index,
            process=process,
            conn=parent,
            ready=self._loop.create_future(),
            dedicated=index < 0,
        )
        if 0 <= index < len(self._procs):
            self._procs[index] = proc
        elif index >= 0:
            self._procs.append(proc)
        threading.Thread(
            target=self._read, args=(proc,), name=f"pool-reader-{index}", daemon=True
        ).start()
        return proc

    def _read(self, proc: _Proc) -> None:
        assert self._loop is not None
        try:
            while True:
                message = proc.conn.recv()
                self._loop.call_soon_threadsafe(self._on_message, proc, message)
        except (EOFError, OSError):
            self._loop.call_soon_threadsafe(self._on_exit, proc)

    def _on_message(self, proc: _Proc, message: FromProcess) -> None:
        match message:
            case Ready(task_ids=task_ids):
                if proc.ready is not None and not proc.ready.done():
                    proc.ready.set_result(task_ids)
            case Failed(traceback=traceback):
                if proc.ready is not None and not proc.ready.done():
                    proc.ready.set_exception(
                        RuntimeError(f"task modules failed to import:\n{traceback}")
                    )
            case Started(attempt_id=attempt_id):
                self.sink(message)
                self._time(proc, attempt_id)
            case Metadata() | Logs():
                self.sink(message)
            case Wait(attempt_id=attempt_id, seq=seq, request=request):
                self._paused.add(attempt_id)
                self._pause_clock(attempt_id)
                self.sink(message)
                if self.waits.enabled and attempt_id not in self._evicting:
                    self.waits.wait(attempt_id, seq, request, time.time())
                    self._evict_due()
            case Result(attempt_id=attempt_id, result=result):
                self._finish(proc, attempt_id, result)

    def _finish(self, proc: _Proc, attempt_id: str, result: AttemptResult) -> None:
        proc.attempts.discard(attempt_id)
        self._where.pop(attempt_id, None)
        self._attempts.pop(attempt_id, None)
        timer = self._timeouts.pop(attempt_id, None)
        if timer is not None:
            timer.cancel()
        self._clocks.pop(attempt_id, None)
        self._paused.discard(attempt_id)
        self.waits.ended(attempt_id)
        self._evicting.discard(attempt_id)
        self.sink(Result(Kind.RESULT, attempt_id, result))
        if proc.dedicated and not proc.dead:
            proc.dead = True  # its end is expected now
            with contextlib.suppress(OSError):
                proc.send(Stop(Kind.STOP))
            self._kill_soon(proc)

    def _on_exit(self, proc: _Proc) -> None:
        if proc.dead:
            return
        proc.dead = True
        if proc.ready is not None and not proc.ready.done():
            proc.ready.set_exception(RuntimeError("a task process exited while starting"))
        lost = list(proc.attempts)
        proc.process.join(1.0)  # the pipe closed: the exit code follows at once
        code = proc.process.exitcode
        for attempt_id in lost:
            attempt = self._attempts.get(attempt_id)
            if attempt_id in self._paused:
                # It was waiting: the scheduler replays it from its journal, as it does for
                # an attempt lost while its run is WAITING, whenever this report arrives.
                result: AttemptResult = {"lost": True}
            elif proc.dedicated and code == -signal.SIGKILL:
                # Killed from outside while holding a memory-limited attempt: the OOM killer.
                result = out_of_memory_result(attempt, "the task process was killed (SIGKILL)")
            else:
                result = {
                    "error": {
                        "type": "TaskProcessCrashed",
                        "message": f"the task process exited with code {code}",
                        "stack_trace": "",
                    },
                    "skip_retrying": False,
                }
            self._finish(proc, attempt_id, result)
        if proc.dedicated:
            return
        if not self._stopping:
            log.warning(
                "task process %d exited (code %s); starting a new one",
                proc.index,
                proc.process.exitcode,
            )
            self._spawn(proc.index)

    @property
    def running(self) -> int:
        return len(self._where)

    def running_attempts(self) -> list[str]:
        return list(self._where)

    def has(self, attempt_id: str) -> bool:
        """The attempt runs (or waits) here and has not ended."""
        return attempt_id in self._where

    def submit(self, attempt: Attempt) -> None:
        """Start an attempt: in a process of its own when it has a memory limit, else on the
        least busy warm process."""
        attempt_id = attempt["attempt_id"]
        self._attempts[attempt_id] = attempt
        if attempt.get("memory_limit"):
            proc = self._spawn(-1, attempt["memory_limit"])
            proc.attempts.add(attempt_id)
            self._where[attempt_id] = proc
            task = asyncio.get_running_loop().create_task(self._run_dedicated(proc, attempt))
            self._kills.add(task)
            task.add_done_callback(self._kills.discard)
            return
        live = [p for p in self._procs if not p.dead]
        proc = min(live, key=lambda p: len(p.attempts))
        proc.attempts.add(attempt_id)
        self._where[attempt_id] = proc
        proc.send(Run(Kind.RUN, attempt))

    def cancel_hooks(self, attempt: Attempt) -> None:
        """Run the on_cancel hooks of a run cancelled with no attempt running (on a warm
        process; nothing is reported back)."""
        live = [p for p in self._procs if not p.dead]
        if live:
            min(live, key=lambda p: len(p.attempts)).send(CancelHooks(Kind.CANCEL_HOOKS, attempt))

    async def _run_dedicated(self, proc: _Proc, attempt: Attempt) -> None:
        assert proc.ready is not None
        try:
            await proc.ready
        except RuntimeError:
            return  # _on_exit reported the attempt
        if attempt["attempt_id"] in proc.attempts and not proc.dead:
            proc.send(Run(Kind.RUN, attempt))

    def _time(self, proc: _Proc, attempt_id: str, seconds: float | None = None) -> None:
        """Start (or restart, with ``seconds`` left) the attempt's max_duration clock."""
        if seconds is None:
            attempt = self._attempts.get(attempt_id)
            seconds = float(attempt.get("max_duration") or 0) if attempt is not None else 0.0
        if seconds > 0:
            loop = asyncio.get_running_loop()
            self._clocks[attempt_id] = (seconds, loop.time())
            self._timeouts[attempt_id] = loop.create_task(
                self._time_out_later(proc, attempt_id, seconds)
            )

    def _pause_clock(self, attempt_id: str) -> None:
        """The attempt waits: stop its clock, keeping the time it has left."""
        timer = self._timeouts.pop(attempt_id, None)
        clock = self._clocks.get(attempt_id)
        if timer is None or clock is None:
            return
        timer.cancel()
        left, started = clock
        self._clocks[attempt_id] = (left - (asyncio.get_running_loop().time() - started), 0.0)

    async def _time_out_later(self, proc: _Proc, attempt_id: str, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if attempt_id not in proc.attempts or proc.dead:
            return
        with contextlib.suppress(OSError):
            proc.send(Timeout(Kind.TIMEOUT, attempt_id))
        await asyncio.sleep(self.cancel_grace)
        if attempt_id not in proc.attempts or proc.dead:
            return
        log.warning("attempt %s ran past its max_duration; killing its process", attempt_id)
        self._timeouts.pop(attempt_id, None)
        self._kill(proc, attempt_id, worker.timeout_result(seconds))

    def resume(self, attempt_id: str, results: list[WaitResult]) -> None:
        """Hand a waiting attempt the results of its completed waits. One this pool no longer
        has is reported lost: the scheduler runs it again, replaying its journal."""
        if attempt_id in self._evicting:
            return  # its "lost" result is on its way; the scheduler replays the run
        proc = self._where.get(attempt_id)
        if proc is not None:
            self._paused.discard(attempt_id)
            self.waits.resumed(attempt_id, (r.seq for r in results))
            proc.send(Resume(Kind.RESUME, attempt_id, results))
            clock = self._clocks.get(attempt_id)
            if clock is not None and attempt_id not in self._timeouts:
                self._time(proc, attempt_id, max(clock[0], 0.001))
        else:
            self.sink(Result(Kind.RESULT, attempt_id, {"lost": True}))

    def _evict_due(self) -> None:
        """Tell the processes to drop the waiting attempts the policy evicts now, and look again
        when it next may have some."""
        for attempt_id in self.waits.due(time.time()):
            proc = self._where.get(attempt_id)
            if proc is None or proc.dead:
                continue
            log.debug("evicting waiting attempt %s", attempt_id)
            self._evicting.add(attempt_id)
            with contextlib.suppress(OSError):
                proc.send(Evict(Kind.EVICT, attempt_id))
        at = self.waits.next_check()
        if at is None or self._stopping:
            return
        if self._check is not None:
            if self._check_at <= at:
                return
            self._check.cancel()
        assert self._loop is not None
        self._check_at = at
        self._check = self._loop.call_later(max(0.0, at - time.time()), self._on_check)

    def _on_check(self) -> None:
        self._check = None
        self._evict_due()

    def cancel(self, attempt_id: str) -> None:
        """Ask the attempt to stop; kill its process if it is still running after the grace."""
        proc = self._where.get(attempt_id)
        if proc is None:
            return
        proc.send(Cancel(Kind.CANCEL, attempt_id))
        task = asyncio.get_running_loop().create_task(self._kill_later(proc, attempt_id))
        self._kills.add(task)
        task.add_done_callback(self._kills.discard)

    async def _kill_later(self, proc: _Proc, attempt_id: str) -> None:
        await asyncio.sleep(self.cancel_grace)
        if attempt_id not in proc.attempts or proc.dead:
            return
        log.warning(
            "attempt %s ignored its cancel; killing task process %d", attempt_id, proc.index
        )
        self._kill(proc, attempt_id, {"canceled": True})

    def _kill(self, proc: _Proc, attempt_id: str, result: AttemptResult) -> None:
        """Kill ``proc`` to stop ``attempt_id`` (reported with ``result``); its neighbours are
        lost, and a warm process is replaced."""
        proc.dead = True
        others = [a for a in proc.attempts if a != attempt_id]
        proc.process.kill()
        for other in others:
            self._finish(proc, other, {"lost": True})
        self._finish(proc, attempt_id, result)
        if not self._stopping and not proc.dedicated:
            self._spawn(proc.index)

    def _kill_soon(self, proc: _Proc) -> None:
        """A dedicated process told to stop: reap it, killing it if it lingers."""

        async def reap() -> None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, proc.process.join, 5.0)
            if proc.process.is_alive():
                proc.process.kill()
                await loop.run_in_executor(None, proc.process.join, 5.0)

        task = asyncio.get_running_loop().create_task(reap())
        self._kills.add(task)
        task.add_done_callback(self._kills.discard)

    async def stop(self, grace: float = 5.0) -> None:
        self._stopping = True
        if self._check is not None:
            self._check.cancel()
        for task in [*self._kills, *self._timeouts.values()]:
            task.cancel()
        for proc in {p for p in self._where.values() if p.dedicated}:
            proc.process.kill()
        for proc in self._procs:
            if not proc.dead:
                with contextlib.suppress(OSError):
                    proc.send(Stop(Kind.STOP))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        for proc in self._procs:
            remaining = max(0.0, deadline - loop.time())
            await loop.run_in_executor(None, proc.process.join, remaining)
            if proc.process.is_alive():
                proc.process.kill()


def out_of_memory_result(attempt: Attempt | None, detail: str) -> AttemptResult:
    """The result of an attempt that ran out of its machine's memory."""
    retry_machine = attempt.get("oom_retry_machine", "") if attempt is not None else ""
    return {
        "error": {
            "type": "OutOfMemoryError",
            "message": f"the attempt ran out of its machine's memory ({detail})",
            "stack_trace": "",
        },
        "out_of_memory": True,
        "retry_machine": retry_machine,
        "skip_retrying": not retry_machine,
    }
