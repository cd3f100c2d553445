"""The ``runplane`` CLI under bad input: a bad payload, task id or key is said in one clear line on
stderr, with nothing on stdout and no traceback, and writes nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.contract import (
    Stack,
    assert_unchanged,
)

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]


# -- the CLI ---------------------------------------------------------------------------------------


def _cli(stack: Stack, *args: str, key: str = "dev") -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "sdk"), str(ROOT / "services"), str(ROOT)]),
        "RUNPLANE_API_URL": stack.api_url,
        "RUNPLANE_SECRET_KEY": stack.keys.get(key, key),
        "RUNPLANE_REALTIME_URL": "",
    }
    return subprocess.run(
        [sys.executable, "-m", "runplane_cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("listing", ["runs", "queues", "schedules", "versions"])
def test_cli_ls_without_a_key_prints_the_error_alone(listing: str) -> None:
    # No table header before the error: the key is checked before the first page is asked for.
    result = subprocess.run(
        [sys.executable, "-m", "runplane_cli", listing, "ls"],
        env={**os.environ, "RUNPLANE_API_URL": "127.0.0.1:1", "RUNPLANE_SECRET_KEY": ""},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "no secret key" in _one_clear_line(result)


def _one_clear_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    assert result.stdout == "", f"nothing on stdout, got {result.stdout!r}"
    return lines[0]


@pytest.mark.parametrize("payload", ["{bad", "", "{'a': 1}", "[1,]"])
def test_cli_trigger_with_a_bad_payload_says_so_in_one_line(stack: Stack, payload: str) -> None:
    before = stack.state()
    line = _one_clear_line(_cli(stack, "trigger", "hello-world", "--payload", payload))
    assert "--payload" in line and "JSON" in line, line
    assert_unchanged(before, stack.state(), "runplane trigger with a bad payload")


def test_cli_trigger_of_a_bad_task_id_says_so_in_one_line(stack: Stack) -> None:
    before = stack.state()
    line = _one_clear_line(_cli(stack, "trigger", "nosuch-task-#!"))
    assert "task_id" in line and "nosuch-task-#!" in line, line
    assert_unchanged(before, stack.state(), "runplane trigger of a bad task id")


def test_cli_trigger_with_an_unknown_key_says_so_in_one_line(stack: Stack) -> None:
    line = _one_clear_line(_cli(stack, "trigger", "hello-world", key="rp_dev_nope"))
    assert "key" in line.lower(), line
