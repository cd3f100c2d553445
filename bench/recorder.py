"""The uniform completion signal used by every benchmarked system.

Each task, as the last thing it does, calls ``record(key, i, t_enq, t_start)``: ONE
``RPUSH <key> "<i> <t_enq> <t_start> <t_end>"`` to a dedicated "recorder" redis-server
that the orchestrator starts (separate from any system's broker). The cost is one
loopback round trip over a raw socket (stdlib only, so it is the same code in the peers
venv and in the product venv), identical for all systems. The client then counts the
list (LLEN) and verifies every index 0..N-1 is present exactly once.

Timestamps are ``time.time()``: t_enq is set by the client right before its enqueue call
and travels in the task payload; t_start is taken on task entry; t_end right before the
RPUSH.
"""

from __future__ import annotations

import os
import threading
import time

from bench.resp import Redis

_local = threading.local()


def _conn() -> Redis:
    pid = os.getpid()
    c = getattr(_local, "conn", None)
    if c is None or getattr(_local, "pid", None) != pid:  # new thread, or forked child
        c = Redis.from_addr(os.environ["BENCH_RECORDER"])
        _local.conn, _local.pid = c, pid
    return c


def record(key: str, i: int, t_enq: float, t_start: float) -> None:
    line = f"{i} {t_enq:.6f} {t_start:.6f} {time.time():.6f}"
    try:
        _conn().call("RPUSH", key, line)
    except (OSError, ConnectionError):
        _local.conn = None
        _conn().call("RPUSH", key, line)
