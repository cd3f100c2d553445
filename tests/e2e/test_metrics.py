"""End to end: every service serves /metrics, /healthz and /readyz on its HTTP port; the series
move by exactly what the runs did, scraped over real HTTP and parsed by prometheus_client."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import runplane
from runplane import RunStatus
from tests.helpers.cluster import ROOT, Cluster, ServiceProcess
from tests.helpers.metrics import get, has, scrape, value
from tests.helpers.nats import NatsServer
from tests.helpers.ports import free_port
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

FINAL = (RunStatus.COMPLETED, RunStatus.FAILED)


async def _final(client: runplane.Client, run_id: str) -> runplane.Run:
    async def done() -> runplane.Run | None:
        run = await client.runs.retrieve(run_id)
        return run if run.status in FINAL else None

    return await eventually(done, 60, description=f"{run_id} final")


async def test_every_service_is_healthy_and_ready(cluster: Cluster) -> None:
    for url in (cluster.scheduler_http_url, cluster.executor_http_url, cluster.realtime_http_url):
        assert await get(url, "/healthz") == (200, "ok\n"), url
        assert await get(url, "/readyz") == (200, "ready\n"), url
        status, _ = await get(url, "/metrics")
        assert status == 200, url


async def test_run_series_move_by_exactly_what_the_runs_did(cluster: Cluster) -> None:
    client = cluster.client()
    before = await scrape(cluster.scheduler_http_url)
    ex_before = await scrape(cluster.executor_http_url)
    rt_before = await scrape(cluster.realtime_http_url)

    hellos = [await client.tasks.trigger("hello-world", {"name": f"n{i}"}) for i in range(3)]
    flaky = await client.tasks.trigger("flaky", {"succeed_on": 99})  # 3 attempts, FAILED
    refused = [await client.tasks.trigger("refuse", None) for _ in range(2)]  # 1 attempt each
    # One realtime subscriber, which ends with the run.
    followed = [run async for run in client.runs.subscribe_to_run(hellos[0])]
    assert followed[-1].status is RunStatus.COMPLETED
    runs = {h.id: await _final(client, h.id) for h in [*hellos, flaky, *refused]}
    assert [r.status for r in runs.values()] == [RunStatus.COMPLETED] * 3 + [RunStatus.FAILED] * 3
    queues = {r.task_id: r.queue for r in runs.values()}

    def moved(after: list, name: str, **labels: str) -> float:  # type: ignore[type-arg]
        return value(after, name, **labels) - value(before, name, **labels)

    async def scheduler_counted() -> bool:
        after = await scrape(cluster.scheduler_http_url)
        expected = {
            ("runplane_runs_triggered_total", "hello-world", None): 3,
            ("runplane_runs_triggered_total", "flaky", None): 1,
            ("runplane_runs_triggered_total", "refuse", None): 2,
            ("runplane_runs_started_total", "hello-world", None): 3,
            ("runplane_runs_started_total", "flaky", None): 1,
            ("runplane_attempts_started_total", "flaky", None): 3,
            ("runplane_attempts_started_total", "refuse", None): 2,
            ("runplane_runs_finished_total", "hello-world", "COMPLETED"): 3,
            ("runplane_runs_finished_total", "flaky", "FAILED"): 1,
            ("runplane_runs_finished_total", "refuse", "FAILED"): 2,
            ("runplane_runs_finished_total", "hello-world", "FAILED"): 0,
            ("runplane_run_execution_seconds_count", "hello-world", "COMPLETED"): 3,
            ("runplane_run_execution_seconds_count", "flaky", "FAILED"): 1,
        }
        for (name, task, status), count in expected.items():
            labels = {"task": task} if status is None else {"task": task, "status": status}
            assert moved(after, name, **labels) == count, (name, labels)
        # Every attempt was dispatched once from QUEUED: 3 + 3 + 2.
        latency = "runplane_dispatch_latency_seconds_count"
        assert moved(after, latency, queue=queues["hello-world"]) == 3
        assert moved(after, latency, queue=queues["flaky"]) == 3
        assert moved(after, latency, queue=queues["refuse"]) == 2
        # Done: nothing queued or running, the executor's slots all free, the outbox drained.
        for queue in queues.values():
            assert value(after, "runplane_queue_depth", queue=queue) == 0
            assert value(after, "runplane_queue_running", queue=queue) == 0
        assert value(after, "runplane_executors_connected") == 1
        assert value(after, "runplane_executor_slots") == 100
        assert value(after, "runplane_executor_free_slots") == 100
        assert has(after, "runplane_outbox_oldest_age_seconds")
        assert value(after, "runplane_outbox_pending") == 0
        assert moved(after, "runplane_outbox_published_total") > 0
        return True

    await eventually(scheduler_counted, 30, description="the scheduler's series")

    async def executor_counted() -> bool:
        after = await scrape(cluster.executor_http_url)
        assert value(after, "runplane_executor_connected") == 1
        assert value(after, "runplane_executor_slots") == 100
        assert value(after, "runplane_executor_free_slots") == 100
        assert value(after, "runplane_executor_running_attempts") == 0
        assert value(after, "runplane_executor_task_processes") == 2
        diff = [
            value(after, name, **labels) - value(ex_before, name, **labels)
            for name, labels in (
                ("runplane_executor_assignments_total", {}),
                ("runplane_executor_attempts_finished_total", {"outcome": "ok"}),
                ("runplane_executor_attempts_finished_total", {"outcome": "error"}),
            )
        ]
        assert diff == [8, 3, 5], diff
        return True

    await eventually(executor_counted, 30, description="the executor's series")

    async def realtime_counted() -> bool:
        after = await scrape(cluster.realtime_http_url)
        opened = "runplane_realtime_subscriptions_total"
        assert value(after, opened, kind="run") - value(rt_before, opened, kind="run") == 1
        assert value(after, opened, kind="tag") == value(rt_before, opened, kind="tag")
        assert value(after, "runplane_realtime_subscribers", kind="run") == 0
        assert value(after, "runplane_realtime_subscribers_dropped_total", kind="run") == 0
        assert value(after, "runplane_realtime_nats_connected") == 1
        return True

    await eventually(realtime_counted, 30, description="the realtime service's series")

    # Every series the Grafana dashboard queries is one the services serve.
    urls = (cluster.scheduler_http_url, cluster.executor_http_url, cluster.realtime_http_url)
    served = {s.name for url in urls for family in await scrape(url) for s in family.samples}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "runplane.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in re.findall(r"runplane_[a-z_]+", target["expr"])
    }
    assert len(queried) >= 15
    assert queried <= served, queried - served


async def test_queue_gauges_count_waiting_and_running_runs(cluster: Cluster) -> None:
    client = cluster.client()
    # Five sleepers on their queue, limited to two: two run, three wait.
    [queue] = [q.name async for q in client.queues.list() if "sleepy" in q.name]
    await client.queues.override_concurrency_limit(queue, 2)
    for _ in range(5):
        await client.tasks.trigger("sleepy", {"seconds": 60})

    async def gauges() -> bool:
        after = await scrape(cluster.scheduler_http_url)
        assert value(after, "runplane_queue_depth", queue=queue) == 3
        assert value(after, "runplane_queue_running", queue=queue) == 2
        assert value(after, "runplane_executor_free_slots") == 98
        ex = await scrape(cluster.executor_http_url)
        assert value(ex, "runplane_executor_running_attempts") == 2
        assert value(ex, "runplane_executor_free_slots") == 98
        return True

    await eventually(gauges, 30, description="the queue gauges")


async def test_readiness_follows_nats(cluster: Cluster, nats_server: NatsServer) -> None:
    await nats_server.stop()

    async def not_ready(url: str) -> str:
        status, body = await get(url, "/readyz")
        assert status == 503, body
        return body

    body = await eventually(lambda: not_ready(cluster.scheduler_http_url), 30)
    assert body == f"not ready: not connected to NATS at {nats_server.url}\n"
    body = await eventually(lambda: not_ready(cluster.realtime_http_url), 30)
    assert body == f"not ready: not connected to NATS at {nats_server.url}\n"
    # Alive all the same, and the lost connection is counted.
    assert await get(cluster.scheduler_http_url, "/healthz") == (200, "ok\n")
    assert value(await scrape(cluster.realtime_http_url), "runplane_nats_errors_total") >= 1
    assert value(await scrape(cluster.realtime_http_url), "runplane_realtime_nats_connected") == 0

    await nats_server.start()
    for url in (cluster.scheduler_http_url, cluster.realtime_http_url):
        await eventually(lambda url=url: _ready(url), 30, description=f"{url} ready again")


async def _ready(url: str) -> bool:
    return await get(url, "/readyz") == (200, "ready\n")


async def test_an_executor_is_not_ready_before_it_registers(cluster: Cluster) -> None:
    # An executor whose scheduler address has no scheduler never registers.
    http_listen = f"127.0.0.1:{free_port()}"
    nowhere = f"127.0.0.1:{free_port()}"
    process = ServiceProcess(
        "unregistered-executor",
        cluster.executor.argv,
        {
            **cluster.executor.env,
            "RUNPLANE_API_URL": nowhere,
            "RUNPLANE_EXECUTOR_LISTEN": f"127.0.0.1:{free_port()}",
            "RUNPLANE_EXECUTOR_HTTP_LISTEN": http_listen,
        },
        cluster.tmp,
    )
    cluster.extra.append(process)  # stopped with the cluster
    process.start()
    url = f"http://{http_listen}"

    async def alive() -> bool:
        try:
            return await get(url, "/healthz") == (200, "ok\n")
        except OSError:  # not listening yet
            return False

    await eventually(alive, 60, description="the executor's HTTP port")
    assert await get(url, "/readyz") == (
        503,
        f"not ready: not registered with the scheduler at {nowhere}\n",
    )
    families = await scrape(url)
    assert value(families, "runplane_executor_connected") == 0
    assert value(families, "runplane_executor_free_slots") == 0
    assert value(families, "runplane_executor_slots") == 100


async def test_dev_writes_and_prints_every_service_url(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPLANE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "sdk"), str(ROOT / "services"), str(ROOT)])
    output = tmp_path / "dev.out"
    with output.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "runplane_cli", "dev", "--tasks", "examples.hello",
            "--port", "0", cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        dev_env = tmp_path / ".runplane" / "dev.env"
        names = ("SCHEDULER", "EXECUTOR", "REALTIME")

        def written() -> dict[str, str] | None:
            if not dev_env.exists():
                return None
            lines = dict(line.split("=", 1) for line in dev_env.read_text().splitlines())
            urls = {n: lines.get(f"RUNPLANE_{n}_HTTP_URL", "") for n in names}
            return urls if all(urls.values()) else None

        urls = await eventually(written, 90, description="dev.env with the HTTP URLs")

        def printed() -> str | None:
            text = output.read_text()
            return text if "metrics and health" in text else None

        text = await eventually(printed, 10, description="dev's line with the URLs")
        for name, url in urls.items():
            assert url.startswith("http://127.0.0.1:"), url
            assert url in text, (name, text)
            assert await get(url, "/readyz") == (200, "ready\n"), name
        executor = await scrape(urls["EXECUTOR"])
        assert value(executor, "runplane_executor_connected") == 1
        scheduler = await scrape(urls["SCHEDULER"])
        assert value(scheduler, "runplane_executors_connected") == 1
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
