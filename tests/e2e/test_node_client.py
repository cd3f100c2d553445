"""The Node.js client (clients/node) against a real cluster: another language on the same gRPC
API, with the protos loaded at runtime."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from tests.helpers.cluster import ROOT, Cluster
from tests.helpers.reflection import list_services

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

NODE_CLIENT = ROOT / "clients" / "node"


CLUSTER_TASKS = "tests.e2e.realtime_tasks"


async def test_the_node_client_triggers_follows_and_reads_a_stream(cluster: Cluster) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").exists():
        pytest.fail("node or clients/node/node_modules missing: run scripts/setup.sh")
    env = {
        **cluster.env,
        "RUNPLANE_API_URL": cluster.api_url,
        "RUNPLANE_REALTIME_URL": cluster.realtime_url,
        "RUNPLANE_SECRET_KEY": cluster.keys["dev"],
    }
    proc = await asyncio.create_subprocess_exec(
        node,
        "test.mjs",
        cwd=NODE_CLIENT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, (
        f"stdout:\n{out.decode()}\nstderr:\n{err.decode()}\n{cluster.logs()}"
    )
    assert out.decode().startswith("ok: run_")


async def test_every_process_lists_its_services_through_reflection(cluster: Cluster) -> None:
    for address, service in (
        (cluster.api_url, "runplane.v1.RunService"),
        (cluster.realtime_url, "runplane.v1.RealtimeService"),
        (cluster.executor_status_url, "runplane.v1.ExecutorService"),
    ):
        listing = await asyncio.to_thread(list_services, address)
        assert listing.get(service), (address, listing)
