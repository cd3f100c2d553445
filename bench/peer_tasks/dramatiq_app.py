"""Dramatiq actors for the benchmark (Redis broker, no results middleware)."""

import os
import time

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.recorder import record

broker = RedisBroker(url=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"))
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="bench_noop", queue_name="bench", max_retries=0)
def noop(k: str, i: int, t: float) -> None:
    record(k, i, t, time.time())


@dramatiq.actor(actor_name="bench_sleep", queue_name="bench", max_retries=0, time_limit=60_000)
def sleep1(k: str, i: int, t: float) -> None:
    s = time.time()
    time.sleep(1.0)
    record(k, i, t, s)
