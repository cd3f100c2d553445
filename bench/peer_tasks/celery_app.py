"""Celery tasks for the benchmark (Redis broker, no result backend)."""

import os
import time

from celery import Celery

from bench.recorder import record

app = Celery("bench", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_ignore_result=True,
    task_default_queue="bench",
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop(k: str, i: int, t: float) -> None:
    record(k, i, t, time.time())


@app.task(name="bench.sleep")
def sleep1(k: str, i: int, t: float) -> None:
    s = time.time()
    time.sleep(1.0)
    record(k, i, t, s)
