"""taskiq tasks for the benchmark (taskiq-nats PullBasedJetStreamBroker, no result backend)."""

import asyncio
import os
import time

from taskiq_nats import PullBasedJetStreamBroker

from bench.recorder import record

broker = PullBasedJetStreamBroker(
    servers=os.environ.get("BENCH_BROKER_URL", "nats://127.0.0.1:4222"),
    subject="bench.tasks",
    stream_name="bench",
    durable="bench_workers",
)


@broker.task(task_name="bench.noop")
async def noop(k: str, i: int, t: float) -> None:
    record(k, i, t, time.time())


@broker.task(task_name="bench.sleep")
async def sleep1(k: str, i: int, t: float) -> None:
    s = time.time()
    await asyncio.sleep(1.0)
    record(k, i, t, s)
