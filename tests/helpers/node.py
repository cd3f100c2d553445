"""The Node.js package (clients/node) in tests: its worker processes beside a cluster, and its own
``node --test`` suite run against one. Without node or a built package the tests skip, or fail
when ``CI`` is set (as for nats-server and PostgreSQL in tests/conftest.py)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers.cluster import ROOT, Cluster, ServiceProcess
from tests.helpers.wait import eventually

NODE_PACKAGE = ROOT / "clients" / "node"
CONFORMANCE_WORKER = NODE_PACKAGE / "dist" / "conformance" / "worker.js"
# Node tasks beyond the conformance set (a task that waits for a Python child).
FIXTURE_WORKER = NODE_PACKAGE / "test" / "fixtures" / "worker.mjs"
READY = "worker ready"


def node_binary() -> str:
    """The node executable, once clients/node is built (scripts/setup.sh builds it)."""
    node = shutil.which("node")
    if node is None or not CONFORMANCE_WORKER.exists():
        message = "node or clients/node/dist missing: run scripts/setup.sh (Node >= 20)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{message} (CI is set, so this fails instead of skipping)", pytrace=False)
        pytest.skip(message)
    return node


def node_env(cluster: Cluster, **extra: str) -> dict[str, str]:
    """What a Node process needs to reach the cluster: its addresses, keys and TLS files."""
    return {
        **cluster.env,
        "RUNPLANE_URL": cluster.api_url,
        "RUNPLANE_API_URL": cluster.api_url,
        "RUNPLANE_REALTIME_URL": cluster.realtime_url,
        "RUNPLANE_SECRET_KEY": cluster.keys["dev"],
        "RUNPLANE_WORKER_KEY": cluster.worker_keys["dev"],
        **extra,
    }


async def start_node_worker(
    cluster: Cluster, name: str, script: Path = CONFORMANCE_WORKER, **env: str
) -> ServiceProcess:
    """Start a Node worker process (the conformance worker unless ``script`` says otherwise)
    beside the cluster, stopped with it; returns once it printed that it is registered."""
    process = ServiceProcess(
        name, [node_binary(), str(script)], node_env(cluster, **env), cluster.tmp
    )
    cluster.extra.append(process)
    process.start()
    await eventually(
        lambda: READY in process.log() or process.process is None or process.process.poll(),
        30,
        description=f"{name} registered",
    )
    assert READY in process.log(), process.log()
    return process


def node_test_files() -> list[str]:
    """Every test file of the package's suite (what ``npm test`` runs), relative to it."""
    return sorted(str(p.relative_to(NODE_PACKAGE)) for p in NODE_PACKAGE.glob("test/*.test.mjs"))


# The spec reporter's summary lines: "<symbol> pass 30".
_SUMMARY = re.compile(r"^\S+ (tests|pass|fail|skipped|cancelled|todo) (\d+)$", re.MULTILINE)


def summary(output: str) -> dict[str, int]:
    """The counts of a ``node --test`` run's summary (tests, pass, fail, skipped, ...)."""
    return {name: int(count) for name, count in _SUMMARY.findall(output)}


async def run_node_tests(env: dict[str, str], *files: str, timeout: float = 150) -> tuple[int, str]:
    """``node --test`` on files of clients/node/test; the exit code and the combined output."""
    proc = await asyncio.create_subprocess_exec(
        node_binary(),
        "--test",
        "--test-reporter=spec",
        *files,
        cwd=NODE_PACKAGE,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")
