"""The ``runplane`` command line: the parser, and the commands that talk to the API through the
SDK's client. The service commands import their service only when run, so ``runplane trigger``
does not load the scheduler, SQLAlchemy or the task modules, and works with ``pip install
runplane`` alone; the service commands (:data:`SERVER_COMMANDS`) need the ``server`` extra and
say so in one line when it is missing."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import asdict
from datetime import timedelta
from typing import Any, TypeVar

import orjson

from runplane import ApiError, Client, ConfigurationError, RunplaneError, RunStatus
from runplane.worker import run_async
from runplane_cli import fail

T = TypeVar("T")

# The commands that run or manage the services, and the import names of the packages of the
# `server` extra (pyproject.toml) they need.
SERVER_COMMANDS = frozenset({"dev", "scheduler", "realtime", "dashboard", "keys", "db"})
SERVER_PACKAGES = (
    "sqlalchemy",
    "alembic",
    "aiosqlite",
    "asyncpg",
    "nats",
    "jsonschema",
    "aiohttp",
    "prometheus_client",
    "cryptography",
)


def missing_server_package() -> str | None:
    """The first package of the server extra that is not installed; None when all are."""
    return next((name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None), None)


def _parse_json(text: str, what: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise ConfigurationError(f"{what} is not valid JSON: {error}") from None


_COLORS = {
    "COMPLETED": "32",  # green
    "FAILED": "31",  # red
    "CRASHED": "31",
    "SYSTEM_FAILURE": "31",
    "TIMED_OUT": "31",
    "EXPIRED": "33",  # yellow
    "CANCELED": "2",  # dim
    "EXECUTING": "36",  # cyan
    "DEQUEUED": "36",
    "WAITING": "35",  # magenta
}


def _color(text: str, status: str) -> str:
    """``text`` in ``status``'s color when stdout is a terminal (and NO_COLOR is not set)."""
    code = _COLORS.get(status)
    if code is None or not sys.stdout.isatty() or os.environ.get("NO_COLOR"):
        return text
    return f"\x1b[{code}m{text}\x1b[0m"


def _status(value: str) -> str:
    """A --status value in any case; an unknown one names the statuses there are."""
    try:
        return RunStatus(value).value
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown status {value!r}; one of {', '.join(s.value.lower() for s in RunStatus)}"
        ) from None


def _print_json(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def _print_run(run: Any) -> None:
    status = _color(f"{run.status}", run.status)
    print(f"{run.id}  {run.task_id}  {status}  attempts={run.attempt_count}")
    if run.output is not None:
        print("output:", orjson.dumps(run.output).decode())
    # A run that completed after a failed attempt still carries that attempt's error.
    if run.error is not None and not run.is_success:
        print(f"error: {run.error.type}: {run.error.message}")


async def _trigger(args: argparse.Namespace) -> int:
    payload = _parse_json(args.payload, "--payload")
    client = Client()
    handle = await client.tasks.trigger(args.task, payload, tags=args.tag or None)
    print(handle.id)
    if not args.wait:
        return 0
    status = None
    async for run in client.runs.subscribe_to_run(handle.id):
        if run.status != status:
            status = run.status
            print(f"  {run.status}", file=sys.stderr)
    final = await client.runs.retrieve(handle.id)
    _print_run(final)
    return 0 if final.is_success else 1


async def _runs(args: argparse.Namespace) -> int:
    client = Client()
    if args.runs_command == "ls":
        runs = client.runs.list(
            status=args.status, task=args.task, tag=args.tag, limit=args.limit, version=args.version
        )
        if args.json:
            _print_json([_run_dict(run) async for run in runs])
            return 0

        def row(run: Any) -> None:
            created = run.created_at.isoformat(timespec="seconds") if run.created_at else ""
            version = run.worker_version or "-"
            status = _color(f"{run.status:<15}", run.status)
            print(f"{run.id:<30} {run.task_id:<24} {status} {created:<25}  {version}")

        header = f"{'RUN':<30} {'TASK':<24} {'STATUS':<15} {'CREATED':<25}  VERSION"
        await _table(header, runs, row)
        return 0
    if args.runs_command == "show":
        _print_json(_run_dict(await client.runs.retrieve(args.run_id)))
        return 0
    if args.runs_command == "logs":
        return await _logs(client, args.run_id, args.follow)
    if args.runs_command == "cancel":
        _print_run(await client.runs.cancel(args.run_id))
        return 0
    if args.runs_command == "replay":
        handle = await client.runs.replay(args.run_id)
        print(handle.id)
        return 0
    if args.runs_command == "migrate":
        return await _migrate(client, args)
    if args.runs_command == "watch":
        async for run in client.runs.subscribe_to_run(args.run_id):
            status = _color(f"{run.status:<15}", run.status)
            print(f"v{run.version:<4} {status} attempts={run.attempt_count}", flush=True)
            if run.is_completed:
                _print_run(run)
        return 0
    return fail(f"unknown runs command {args.runs_command}")


async def _table(header: str, items: AsyncIterable[T], row: Callable[[T], None]) -> None:
    """``header``, then a ``row`` per item: the header only once the first page has come, so a
    listing that fails (no key, no scheduler) prints its error alone."""
    iterator = aiter(items)
    first = await anext(iterator, None)
    print(header)
    if first is None:
        return
    row(first)
    async for item in iterator:
        row(item)


async def _logs(client: Client, run_id: str, follow: bool) -> int:
    """A run's log lines; with ``follow``, new ones as they come until the run has finished."""
    printed = 0
    while True:
        # Read before the lines: lines written before the run finished are all there then.
        final = (await client.runs.retrieve(run_id)).is_completed if follow else True
        seen = 0
        async for entry in client.runs.logs(run_id):
            seen += 1
            if seen <= printed:
                continue
            attributes = " " + orjson.dumps(entry.attributes).decode() if entry.attributes else ""
            stamp = entry.time.isoformat(timespec="milliseconds")
            print(
                f"{stamp} #{entry.attempt_number} {entry.level.upper():<7} "
                f"{entry.message}{attributes}",
                flush=follow,
            )
        printed = max(printed, seen)
        if final:
            return 0
        await asyncio.sleep(1.0)


def _confirm_migration(args: argparse.Namespace) -> str:
    """runs migrate warns before it moves or fails runs; '' when the operator goes ahead, else
    why not."""
    if bool(args.run_id) == bool(args.from_version):
        return "give run ids or --from-version (one of the two)"
    which = (
        f"{len(args.run_id)} run(s)"
        if args.run_id
        else f"every PENDING_VERSION run locked to {args.from_version}"
    )
    if args.fail:
        warning = f"{which} will FAIL (error VERSION_UNAVAILABLE); their parents see the failure."
    else:
        warning = (
            f"{which} will lock to version {args.to_version}. A run that was waiting replays "
            "its wait journal on that version's code: if that code makes different waits, or "
            "in another order, the replay fails or repeats side effects."
        )
    print(f"warning: {warning}", file=sys.stderr)
    if args.yes:
        return ""
    if not sys.stdin.isatty():
        return "not confirmed: add --yes to go ahead"
    if input("go ahead? [y/N] ").strip().lower() not in ("y", "yes"):
        return "not confirmed"
    return ""


async def _migrate(client: Client, args: argparse.Namespace) -> int:
    """runs migrate: an operator moves PENDING_VERSION runs off a version that is gone."""
    done = await client.versions.migrate_runs(
        args.run_id, from_version=args.from_version, to_version=args.to_version, fail=args.fail
    )
    for run_id in done.migrated:
        print(run_id)
    verb = "failed" if args.fail else f"moved to {args.to_version}"
    print(f"{len(done.migrated)} run(s) {verb}", file=sys.stderr)
    for run_id in done.skipped:
        print(f"skipped {run_id}: not waiting in PENDING_VERSION", file=sys.stderr)
    return 0


def _print_version(v: Any) -> None:
    promoted = v.promoted_at.isoformat(timespec="seconds") if v.promoted_at else "-"
    state = "current" if v.is_current else ("rolled back" if v.rolled_back else "")
    if v.is_current and len(v.current_for) < len(v.task_ids):
        state = f"current for {', '.join(v.current_for)}"
    print(
        f"{v.version:<24} {state:<12} {v.executors:>9} {v.active_runs:>11}  {promoted:<25} "
        f"{', '.join(v.task_ids)}"
    )


async def _versions(args: argparse.Namespace) -> int:
    api = Client().versions
    command = "promote" if args.command == "deploy" else args.versions_command
    if command == "ls":
        listing = await api.list()
        if args.json:
            _print_json([_run_dict(v) for v in listing])
            return 0
        print(
            f"{'VERSION':<24} {'STATE':<12} {'EXECUTORS':>9} {'ACTIVE RUNS':>11}  "
            f"{'PROMOTED':<25} TASKS"
        )
        for v in listing:
            _print_version(v)
        return 0
    if command == "promote":
        v = await api.promote(args.version)
        print(f"version {v.version} is current: new runs of {', '.join(v.current_for)} lock to it")
        return 0
    v = await api.rollback()
    print(f"rolled back: version {v.version} is current again for {', '.join(v.current_for)}")
    return 0


async def _queues(args: argparse.Namespace) -> int:
    client = Client()
    if args.queues_command == "ls":
        if args.json:
            _print_json([_run_dict(q) async for q in client.queues.list()])
            return 0

        def row(q: Any) -> None:
            limit = str(q.concurrency_limit) if q.concurrency_limit else "-"
            state = "paused" if q.paused else "active"
            print(f"{q.name:<32} {q.running:>7} {q.queued:>7} {limit:>6}  {state}")

        header = f"{'QUEUE':<32} {'RUNNING':>7} {'QUEUED':>7} {'LIMIT':>6}  STATE"
        await _table(header, client.queues.list(), row)
        return 0
    if args.queues_command == "pause":
        q = await client.queues.pause(args.queue)
        print(f"{q.name} paused ({q.running} running, {q.queued} queued)")
        return 0
    q = await client.queues.resume(args.queue)
    print(f"{q.name} resumed ({q.running} running, {q.queued} queued)")
    return 0


def _print_schedule(s: Any) -> None:
    state = "active" if s.active else "inactive"
    next_run = s.next_run.isoformat(timespec="seconds") if s.next_run else "-"
    print(
        f"{s.id}  {s.task_id:<24} {s.cron!r:<18} {s.timezone:<20} {state:<8} "
        f"next={next_run}  {s.type.lower()}"
    )


async def _schedules(args: argparse.Namespace) -> int:
    api = Client().schedules
    command = args.schedules_command
    if command == "ls":
        if args.json:
            _print_json([_run_dict(schedule) async for schedule in api.list(task=args.task)])
            return 0
        header = (
            f"{'SCHEDULE':<30}  {'TASK':<24} {'CRON':<18} {'TIMEZONE':<20} {'STATE':<8} NEXT  TYPE"
        )
        await _table(header, api.list(task=args.task), _print_schedule)
        return 0
    if command == "create":
        _print_schedule(
            await api.create(
                task=args.task,
                cron=args.cron,
                timezone=args.timezone,
                external_id=args.external_id,
                deduplication_key=args.deduplication_key,
            )
        )
        return 0
    if command == "show":
        _print_json(_run_dict(await api.retrieve(args.schedule_id)))
        return 0
    actions = {"delete": api.delete, "activate": api.activate, "deactivate": api.deactivate}
    _print_schedule(await actions[command](args.schedule_id))
    return 0


def _run_dict(item: Any) -> dict[str, Any]:
    """An SDK model (a run, queue, schedule, version) as JSON-ready data."""
    data = asdict(item)
    data.pop("raw", None)
    return {k: _jsonable(v) for k, v in data.items()}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runplane", description="Durable background tasks for Python."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run everything locally (SQLite, a NATS server, all services)")
    dev.add_argument(
        "--tasks", action="append", required=True, metavar="MODULE", help="task module to load"
    )
    dev.add_argument("--port", type=int, default=7070, help="scheduler port (a free one if taken)")
    dev.add_argument("--trigger", metavar="TASK", help="once ready, trigger TASK and show its run")
    dev.add_argument("--payload", default="null", help="JSON payload for --trigger")
    dev.add_argument("--exit", action="store_true", help="stop after the --trigger run finishes")
    dev.add_argument(
        "--tls",
        action="store_true",
        help="serve everything over TLS, with a throwaway CA and certificates in .runplane/tls/",
    )

    sub.add_parser("scheduler", help="run the scheduler (RUNPLANE_DATABASE_URL, RUNPLANE_NATS_URL)")
    ex = sub.add_parser("executor", help="run an executor with the given task modules")
    ex.add_argument("--tasks", action="append", required=True, metavar="MODULE")
    ex.add_argument("--processes", type=int, help="task processes (default: CPU count)")
    ex.add_argument("--capacity", type=int, help="attempts at once (default 100)")
    ex.add_argument(
        "--version",
        help="the worker version to register (default: RUNPLANE_VERSION, else a hash of the "
        "task definitions and modules' source)",
    )
    ex.add_argument(
        "--max-resident-waits",
        type=int,
        help="waiting runs kept in memory; more are evicted, then replayed from their journal "
        "(default 1000, 0: no cap)",
    )
    ex.add_argument(
        "--evict-waits-after",
        type=float,
        metavar="SECONDS",
        help="evict a token or child-run wait after this long, a longer duration wait at once "
        "(default 60, 0: never)",
    )
    sub.add_parser("realtime", help="run the realtime service")
    sub.add_parser(
        "dashboard",
        help="run the web dashboard (RUNPLANE_DASHBOARD_LISTEN, RUNPLANE_API_URL); log in with "
        "a secret key",
    )

    trig = sub.add_parser("trigger", help="trigger a task")
    trig.add_argument("task")
    trig.add_argument("--payload", default="null", help="JSON payload")
    trig.add_argument("--tag", action="append")
    trig.add_argument("--wait", action="store_true", help="follow the run to its end")

    runs = sub.add_parser("runs", help="list, show, cancel, watch runs and read their logs")
    rsub = runs.add_subparsers(dest="runs_command", required=True)
    ls = rsub.add_parser("ls")
    ls.add_argument("--status", action="append", type=_status, help="any case: failed, FAILED")
    ls.add_argument("--task", action="append")
    ls.add_argument("--tag", action="append")
    ls.add_argument("--version", help="only the runs locked to this worker version")
    ls.add_argument("--limit", type=int, default=20)
    _json_flag(ls)
    for name in ("show", "logs", "cancel", "replay", "watch"):
        rsub.add_parser(name).add_argument("run_id")
    rsub.choices["logs"].add_argument(
        "-f", "--follow", action="store_true", help="print new lines until the run finishes"
    )
    migrate = rsub.add_parser(
        "migrate",
        help="move PENDING_VERSION runs off a version whose executors are gone, or fail them",
    )
    migrate.add_argument("run_id", nargs="*", help="the runs (or use --from-version)")
    migrate.add_argument("--from-version", default="", help="every PENDING_VERSION run of it")
    target = migrate.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-version", default="", help="lock the runs to this version")
    target.add_argument("--fail", action="store_true", help="fail the runs")
    migrate.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    versions = sub.add_parser(
        "versions", help="list worker versions, promote one, roll back the latest promotion"
    )
    vsub = versions.add_subparsers(dest="versions_command", required=True)
    _json_flag(
        vsub.add_parser("ls", help="versions, newest first, with their executors and active runs")
    )
    vsub.add_parser("promote", help="make a version current").add_argument("version")
    vsub.add_parser("rollback", help="make the previously promoted version current again")
    deploy = sub.add_parser(
        "deploy", help="make a registered worker version current (versions promote)"
    )
    deploy.add_argument("version")

    queues = sub.add_parser("queues", help="list, pause and resume queues")
    qsub = queues.add_subparsers(dest="queues_command", required=True)
    _json_flag(qsub.add_parser("ls"))
    for name in ("pause", "resume"):
        qsub.add_parser(name).add_argument("queue", help="queue name or id")
    sched = sub.add_parser("schedules", help="list, create and change cron schedules")
    ssub = sched.add_subparsers(dest="schedules_command", required=True)
    sls = ssub.add_parser("ls", help="list schedules")
    sls.add_argument("--task", action="append", help="only this task's schedules")
    _json_flag(sls)
    screate = ssub.add_parser("create", help="create (or, by --dedup-key, update) a schedule")
    screate.add_argument("task")
    screate.add_argument("--cron", required=True, help='five fields, e.g. "0 9 * * 1-5"')
    screate.add_argument("--timezone", default="UTC", help="IANA time zone (default UTC)")
    screate.add_argument("--external-id")
    screate.add_argument("--dedup-key", dest="deduplication_key")
    for name in ("show", "delete", "activate", "deactivate"):
        ssub.add_parser(name).add_argument("schedule_id")

    keys = sub.add_parser(
        "keys", help="create, list, revoke and rotate keys (against RUNPLANE_DATABASE_URL)"
    )
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="create a key and print it (shown only this once)")
    kc.add_argument("--env", required=True, choices=["dev", "staging", "prod"])
    kc.add_argument(
        "--kind",
        default="secret",
        choices=["secret", "worker"],
        help="secret: trigger, read and manage runs; worker: only connect an executor",
    )
    kc.add_argument(
        "--execute", action="store_true", help="a secret key that may also connect an executor"
    )
    kc.add_argument("--name", default="", help="a label shown by `keys ls`")
    kls = ksub.add_parser("ls", help="list keys (never the keys themselves)")
    kls.add_argument("--env", choices=["dev", "staging", "prod"])
    kls.add_argument("--json", action="store_true", help="as JSON")
    ksub.add_parser(
        "revoke", help="revoke a key: every service refuses it within seconds"
    ).add_argument("key_id")
    krot = ksub.add_parser(
        "rotate",
        help="print a new key with the same environment, rights and name, and revoke the old one",
    )
    krot.add_argument("key_id")
    krot.add_argument(
        "--grace",
        metavar="DURATION",
        help='keep the old key working this long (e.g. "10m", "1h"), to switch over without a gap',
    )

    dbp = sub.add_parser("db", help="database")
    dsub = dbp.add_subparsers(dest="db_command", required=True)
    dsub.add_parser("upgrade", help="apply migrations")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # here, where a closed pipe is caught below, not at exit
        sys.exit(code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # `runplane runs ls | head`: the reader went away. Quiet, like other Unix tools; point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except (ApiError, ConfigurationError) as error:
        sys.exit(fail(str(error)))
    except RunplaneError as error:
        sys.exit(fail(f"{type(error).__name__}: {error}"))


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in SERVER_COMMANDS and (missing := missing_server_package()):
        return fail(
            f"`runplane {args.command}` needs the server extra ({missing} is not installed): "
            'pip install "runplane[server]"'
        )
    # Each service command imports its service here: the others need none of it.
    if args.command == "dev":
        from runplane_cli.dev import run_dev

        return run_dev(args, os.environ)
    if args.command == "scheduler":
        from runplane_scheduler.app import main as scheduler_main

        scheduler_main()
        return 0
    if args.command == "executor":
        from runplane_executor.app import main as executor_main

        executor_main(
            args.tasks,
            processes=args.processes,
            capacity=args.capacity,
            max_resident_waits=args.max_resident_waits,
            evict_waits_after=args.evict_waits_after,
            version=args.version,
        )
        return 0
    if args.command == "realtime":
        from runplane_realtime.server import main as realtime_main

        realtime_main()
        return 0
    if args.command == "dashboard":
        from runplane_dashboard.app import main as dashboard_main

        dashboard_main()
        return 0
    if args.command == "trigger":
        return run_async(_trigger(args))
    if args.command == "runs":
        if args.runs_command == "migrate" and (refused := _confirm_migration(args)):
            return fail(refused)
        return run_async(_runs(args))
    if args.command == "queues":
        return run_async(_queues(args))
    if args.command in ("versions", "deploy"):
        return run_async(_versions(args))
    if args.command == "schedules":
        return run_async(_schedules(args))
    if args.command in ("keys", "db"):
        from runplane_cli import keys

        return keys.keys(args) if args.command == "keys" else keys.db_upgrade(args)
    return fail(f"unknown command {args.command}")
