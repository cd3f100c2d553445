"""`runplane dev`: one command starts NATS and every service, runs a task, and stops cleanly."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cluster import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


async def test_dev_runs_an_example_and_stops(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("RUNPLANE_")
    }  # the embedded default: SQLite under .runplane/ and a NATS server of its own
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "sdk"), str(ROOT / "services"), str(ROOT)])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runplane_cli", "dev", "--tasks", "examples.hello", "--port", "0",
        "--trigger", "hello-world", "--payload", '{"name": "dev"}', "--exit",
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 100)
    text = out.decode()
    assert proc.returncode == 0, text
    for service in ("nats", "scheduler", "realtime", "executor", "dashboard"):
        assert f"{service:>9} | started" in text, text
        assert f"{service:>9} | stopped" in text, text
    assert "Hello, dev!" in text
    assert "COMPLETED" in text
    dev_env = (tmp_path / ".runplane" / "dev.env").read_text()
    for name in (
        "RUNPLANE_API_URL",
        "RUNPLANE_REALTIME_URL",
        "RUNPLANE_SECRET_KEY",
        "RUNPLANE_DASHBOARD_URL",
    ):
        assert f"{name}=" in dev_env
    dashboard_url = next(
        line.split("=", 1)[1]
        for line in dev_env.splitlines()
        if line.startswith("RUNPLANE_DASHBOARD_URL=")
    )
    assert dashboard_url.startswith("http://127.0.0.1:"), dev_env
    assert f"dashboard: {dashboard_url}" in text, text
    assert (tmp_path / ".runplane" / "runplane.db").exists()
