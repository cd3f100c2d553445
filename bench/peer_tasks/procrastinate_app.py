"""procrastinate tasks for the benchmark (PostgreSQL via psycopg 3)."""

import asyncio
import os
import time

from procrastinate import App, PsycopgConnector

from bench.recorder import record

app = App(
    connector=PsycopgConnector(
        conninfo=os.environ.get("BENCH_BROKER_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
)


@app.task(name="bench.noop", queue="bench")
async def noop(k: str, i: int, t: float) -> None:
    record(k, i, t, time.time())


@app.task(name="bench.sleep", queue="bench")
async def sleep1(k: str, i: int, t: float) -> None:
    s = time.time()
    await asyncio.sleep(1.0)
    record(k, i, t, s)
