"""``pip install runplane`` without extras is a working client and task runtime: in a fresh
virtualenv, built from this checkout's wheel under ``constraints.txt``, none of the server extra
is importable, the SDK triggers a run and follows it to COMPLETED on a real stack (scheduler and
realtime from the development environment, the executor from the client install), the CLI's API
commands work, and its service commands say to install ``runplane[server]``.

Takes half a minute or so (pip resolves against the index, the downloads come from pip's cache);
``RUNPLANE_SKIP_INSTALL_TESTS=1`` skips it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers.cluster import Cluster
from tests.helpers.nats import NatsServer

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        os.environ.get("RUNPLANE_SKIP_INSTALL_TESTS", "") not in ("", "0"),
        reason="RUNPLANE_SKIP_INSTALL_TESTS is set",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
# Import names of the server extra's packages (pyproject.toml): none may be in a client install.
SERVER_ONLY = (
    "sqlalchemy",
    "alembic",
    "aiosqlite",
    "asyncpg",
    "aiohttp",
    "nats",
    "jsonschema",
    "prometheus_client",
    "cryptography",
)
SERVICE_COMMANDS = (
    ("scheduler",),
    ("realtime",),
    ("dashboard",),
    ("dev", "--tasks", "install_tasks"),
    ("keys", "ls"),
    ("db", "upgrade"),
)

TASKS = """
import importlib.util
import sys

from runplane import Context, task


@task(id="install-check")
async def install_check(payload: dict[str, str], ctx: Context) -> dict[str, object]:
    return {
        "hello": payload["name"],
        "prefix": sys.prefix,
        "server_packages": [n for n in SERVER_ONLY if importlib.util.find_spec(n) is not None],
    }
""".replace("SERVER_ONLY", repr(SERVER_ONLY))

CLIENT = """
import asyncio
import sys

import orjson

import runplane


async def main() -> None:
    client = runplane.Client()
    handle = await client.tasks.trigger("install-check", {"name": "pip"}, tags=["install"])
    statuses = []
    async for run in client.runs.subscribe_to_run(handle):
        statuses.append(run.status.value)
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))
    print(orjson.dumps({"statuses": statuses, "output": run.output, "loaded": loaded}).decode())


asyncio.run(main())
"""


def _step(message: str, started: float) -> None:
    print(f"install test [{time.monotonic() - started:5.1f}s] {message}", flush=True)


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)


def _checked(argv: list[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = _run(argv, **kwargs)
    assert result.returncode == 0, (
        f"{what} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result


def _client_install(tmp: Path, started: float) -> Path:
    """A fresh virtualenv with this checkout's wheel and its dependencies only (no extras)."""
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for tree in ("sdk", "services"):
        shutil.copytree(ROOT / tree, source / tree, ignore=ignore)
    _step("building the wheel", started)
    _checked(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "--disable-pip-version-check", "-w", str(tmp / "dist"), str(source)],
        "pip wheel",
    )  # fmt: skip
    (wheel,) = (tmp / "dist").glob("runplane-*.whl")
    venv = tmp / "venv"
    _step(f"creating {venv}", started)
    _checked([sys.executable, "-m", "venv", "--without-pip", str(venv)], "python -m venv")
    python = venv / "bin" / "python"
    _step(f"pip install {wheel.name} -c constraints.txt (no extras)", started)
    _checked(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile",
         "--disable-pip-version-check", "-c", str(ROOT / "constraints.txt"), str(wheel)],
        "pip install runplane",
    )  # fmt: skip
    _step("installed", started)
    return venv


def _client_env(**extra: str) -> dict[str, str]:
    """The test's environment without what points Python at this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(extra)
    return env


async def test_a_client_only_install_triggers_and_follows_a_run(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    started = time.monotonic()
    venv = _client_install(tmp_path, started)
    python = str(venv / "bin" / "python")
    cli = str(venv / "bin" / "runplane")
    work = tmp_path / "work"  # the client's current directory: not this checkout
    work.mkdir()
    (work / "install_tasks.py").write_text(TASKS)

    _step("checking what the client install can import", started)
    probe = _checked(
        [python, "-c", textwrap.dedent(f"""
            import importlib.util, runplane, runplane_executor.app, runplane_cli.main
            print(runplane.__file__)
            print(",".join(n for n in {SERVER_ONLY!r} if importlib.util.find_spec(n)))
        """)],
        "importing the SDK, the executor and the CLI",
        cwd=work,
        env=_client_env(),
    )  # fmt: skip
    where, present = probe.stdout.splitlines()
    assert Path(where).is_relative_to(venv), f"runplane imported from {where}, not the venv"
    assert present == "", f"server-only packages in a client install: {present}"

    _step("the service commands without the server extra", started)
    for command in SERVICE_COMMANDS:
        result = _run([cli, *command], cwd=work, env=_client_env(), timeout=60)
        assert result.returncode == 2, (command, result)
        assert "Traceback" not in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1, f"one line, got {result.stderr!r}"
        assert 'pip install "runplane[server]"' in result.stderr, result.stderr
        assert result.stdout == ""

    # An executor asked for its HTTP port, which needs the extra, says so before it connects.
    result = _run(
        [cli, "executor", "--processes", "1", "--tasks", "install_tasks"],
        cwd=work,
        env=_client_env(
            PYTHONPATH=str(work),
            RUNPLANE_WORKER_KEY="rp_dev_unused",
            RUNPLANE_EXECUTOR_HTTP_LISTEN="127.0.0.1:0",
        ),
        timeout=60,
    )
    assert result.returncode == 2, result
    assert "RUNPLANE_EXECUTOR_HTTP_LISTEN" in result.stderr, result.stderr
    assert 'pip install "runplane[server]"' in result.stderr, result.stderr

    _step("starting scheduler and realtime, and the executor from the client install", started)
    cluster = Cluster(
        tmp_path,
        nats_server.url,
        f"sqlite+aiosqlite:///{tmp_path / 'runplane.db'}",
        tasks="install_tasks",
        # Its HTTP port (/metrics) needs the server extra: without it the executor runs without.
        env={"RUNPLANE_EXECUTOR_HTTP_LISTEN": "", "PYTHONPATH": str(work)},
    )
    cluster.executor.argv = [
        *(python, "-m", "runplane_cli", "executor", "--processes", "1"),
        *("--tasks", "install_tasks"),
    ]
    await cluster.start()
    try:
        _step("triggering and following a run with the client install's SDK", started)
        env = _client_env(
            RUNPLANE_API_URL=cluster.api_url,
            RUNPLANE_REALTIME_URL=cluster.realtime_url,
            RUNPLANE_SECRET_KEY=cluster.keys["dev"],
        )
        (work / "client.py").write_text(CLIENT)
        result = _checked(
            [python, "client.py", *SERVER_ONLY], "the client script", cwd=work, env=env, timeout=120
        )
        seen = orjson.loads(result.stdout)
        assert seen["statuses"][-1] == "COMPLETED", seen
        assert seen["loaded"] == [], f"the client loaded server-only packages: {seen['loaded']}"
        output = seen["output"]
        assert output["hello"] == "pip"
        # The attempt ran in a task process of the client install's executor.
        assert Path(output["prefix"]).resolve() == venv.resolve(), output
        assert output["server_packages"] == []

        _step("runplane trigger --wait and runs ls from the client install's CLI", started)
        result = _checked(
            [cli, "trigger", "install-check", "--payload", '{"name": "cli"}', "--wait"],
            "runplane trigger --wait",
            cwd=work,
            env=env,
            timeout=120,
        )
        assert "COMPLETED" in result.stdout, result.stdout
        listing = _checked([cli, "runs", "ls"], "runplane runs ls", cwd=work, env=env, timeout=60)
        assert listing.stdout.count("install-check") == 2, listing.stdout
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        await cluster.stop()
    _step("done", started)
