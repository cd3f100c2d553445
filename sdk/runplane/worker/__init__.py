"""The worker side of runplane: the runtime of a task process, for the executor that runs task
code (``runplane executor``).

Entry point: start :func:`main` in a new process (the ``spawn`` start method) with one end of a
duplex pipe, the task modules to import, a memory limit (bytes, 0: none) and the output limit::

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    ctx.Process(target=runplane.worker.main, args=(child, ["my_tasks"], 0, output_limit)).start()

The process imports the modules and answers :class:`Ready` (or :class:`Failed`); from then on the
executor sends it :class:`Run`, :class:`Cancel`, :class:`Timeout`, :class:`Resume`,
:class:`Evict`, :class:`CancelHooks` and :class:`Stop`, and it reports each attempt's
:class:`Started`, :class:`Metadata`, :class:`Logs`, :class:`Wait` and :class:`Result`. Many
attempts run at once on the process's event loop (plain ``def`` tasks in threads), with their
hooks; see ``runplane._hooks`` for their order.

Also here, for the executor's control process: :func:`import_task_modules` (the tasks it
declares in its manifest), :func:`declared_schedules`, the machines (:data:`MACHINES`), and
:func:`configure_logging` and :func:`run_async`, which set up any runplane process.
"""

from runplane._log import configure_logging, run_async
from runplane._schedules import DeclaredSchedule, declared_schedules
from runplane._task import DEFAULT_MACHINE, MACHINES
from runplane.worker._messages import (
    Attempt,
    AttemptResult,
    AttemptRun,
    Cancel,
    CancelHooks,
    ErrorInfo,
    Evict,
    Failed,
    FromProcess,
    Kind,
    Logs,
    Metadata,
    MetadataUpdate,
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
    WaitOutcome,
    WaitRequest,
    WaitResult,
)
from runplane.worker._process import (
    DEFAULT_OUTPUT_LIMIT,
    EVICTED,
    OutputTooLargeError,
    TaskProcess,
    import_task_modules,
    main,
    timeout_result,
)
from runplane.worker._waiter import AttemptWaiter

__all__ = [
    "DEFAULT_MACHINE",
    "DEFAULT_OUTPUT_LIMIT",
    "EVICTED",
    "MACHINES",
    "Attempt",
    "AttemptResult",
    "AttemptRun",
    "AttemptWaiter",
    "Cancel",
    "CancelHooks",
    "DeclaredSchedule",
    "ErrorInfo",
    "Evict",
    "Failed",
    "FromProcess",
    "Kind",
    "Logs",
    "Metadata",
    "MetadataUpdate",
    "OutputTooLargeError",
    "Ready",
    "Report",
    "Result",
    "Resume",
    "Run",
    "Started",
    "Stop",
    "TaskProcess",
    "Timeout",
    "ToProcess",
    "Wait",
    "WaitOutcome",
    "WaitRequest",
    "WaitResult",
    "configure_logging",
    "declared_schedules",
    "import_task_modules",
    "main",
    "run_async",
    "timeout_result",
]
