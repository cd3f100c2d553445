"""A warm pool of task processes, owned by the executor's control loop.

An attempt that must be stopped hard (cancelled but still running after the grace period) is
stopped by killing its process; the other attempts of that process are reported lost (run again
without counting against their retries) and the process is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from runplane_executor import taskproc

log = logging.getLogger("runplane.executor.pool")

# (kind, attempt_id, result dict | None)
EventSink = Callable[[str, str, dict[str, Any] | None], None]


@dataclass
class _Proc:
    index: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    attempts: set[str] = field(default_factory=set)
    ready: asyncio.Future[list[str]] | None = None
    dead: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            self.conn.send(message)


class ProcessPool:
    def __init__(
        self, modules: list[str], size: int, sink: EventSink, cancel_grace: float = 3.0
    ) -> None:
        self.modules = modules
        self.size = max(1, size)
        self.sink = sink
        self.cancel_grace = cancel_grace
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list[_Proc] = []
        self._where: dict[str, _Proc] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._kills: set[asyncio.Task[None]] = set()
        self.task_ids: list[str] = []

    async def start(self) -> list[str]:
        """Start the processes; returns the task ids they provide."""
        self._loop = asyncio.get_running_loop()
        procs = [self._spawn(i) for i in range(self.size)]
        results = await asyncio.gather(*(p.ready for p in procs if p.ready is not None))
        self.task_ids = results[0]
        return self.task_ids

    def _spawn(self, index: int) -> _Proc:
        assert self._loop is not None
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=taskproc.main,
            args=(child, self.modules),
            name=f"runplane-task-{index}",
            daemon=True,
        )
        process.start()
        child.close()
        proc = _Proc(index=index, process=process, conn=parent, ready=self._loop.create_future())
        if index < len(self._procs):
            self._procs[index] = proc
        else:
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

    def _on_message(self, proc: _Proc, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            if proc.ready is not None and not proc.ready.done():
                proc.ready.set_result(message[1])
        elif kind == "failed":
            if proc.ready is not None and not proc.ready.done():
                proc.ready.set_exception(
                    RuntimeError(f"task modules failed to import:\n{message[1]}")
                )
        elif kind == "started":
            self.sink("started", message[1], None)
        elif kind == "wait":
            self.sink("wait", message[1], {"seq": message[2], "request": message[3]})
        elif kind == "result":
            attempt_id = message[1]
            proc.attempts.discard(attempt_id)
            self._where.pop(attempt_id, None)
            self.sink("result", attempt_id, message[2])

    def _on_exit(self, proc: _Proc) -> None:
        if proc.dead:
            return
        proc.dead = True
        if proc.ready is not None and not proc.ready.done():
            proc.ready.set_exception(RuntimeError("a task process exited while starting"))
        lost = list(proc.attempts)
        proc.attempts.clear()
        for attempt_id in lost:
            self._where.pop(attempt_id, None)
            self.sink(
                "result",
                attempt_id,
                {
                    "error": {
                        "type": "TaskProcessCrashed",
                        "message": f"the task process exited with code {proc.process.exitcode}",
                        "stack_trace": "",
                    },
                    "skip_retrying": False,
                },
            )
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

    def submit(self, attempt: dict[str, Any]) -> None:
        """Start an attempt on the least busy live process."""
        live = [p for p in self._procs if not p.dead]
        proc = min(live, key=lambda p: len(p.attempts))
        attempt_id = attempt["attempt_id"]
        proc.attempts.add(attempt_id)
        self._where[attempt_id] = proc
        proc.send(("run", attempt))

    def resume(self, attempt_id: str, results: list[Any]) -> None:
        """Hand a waiting attempt the results of its completed waits. One this pool no longer
        has is reported lost: the scheduler runs it again, replaying its journal."""
        proc = self._where.get(attempt_id)
        if proc is not None:
            proc.send(("resume", attempt_id, results))
        else:
            self.sink("result", attempt_id, {"lost": True})

    def cancel(self, attempt_id: str) -> None:
        """Ask the attempt to stop; kill its process if it is still running after the grace."""
        proc = self._where.get(attempt_id)
        if proc is None:
            return
        proc.send(("cancel", attempt_id))
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
        proc.dead = True
        others = [a for a in proc.attempts if a != attempt_id]
        proc.attempts.clear()
        proc.process.kill()
        for other in others:
            self._where.pop(other, None)
            self.sink("result", other, {"lost": True})
        self._where.pop(attempt_id, None)
        self.sink("result", attempt_id, {"canceled": True})
        if not self._stopping:
            self._spawn(proc.index)

    async def stop(self, grace: float = 5.0) -> None:
        self._stopping = True
        for task in self._kills:
            task.cancel()
        for proc in self._procs:
            if not proc.dead:
                with contextlib.suppress(OSError):
                    proc.send(("stop",))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        for proc in self._procs:
            remaining = max(0.0, deadline - loop.time())
            await loop.run_in_executor(None, proc.process.join, remaining)
            if proc.process.is_alive():
                proc.process.kill()
