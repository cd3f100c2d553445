"""The one benchmark client process: enqueue a workload, wait for completions, verify, report.

Run as ``python -m bench.client --workload W1 --n 10000 --key K ...`` from the repo root, in
the venv of the system under test (peers venv, or the product venv for runplane). The
system is chosen by ``BENCH_CLIENT`` (module name under ``bench/clients``); its broker
settings come from ``BENCH_*`` env vars. Prints one JSON line (last line of stdout).

Completion is read from the recorder redis (``BENCH_RECORDER``): every task RPUSHes one
``"i t_enq t_start t_end"`` line to list ``K``. Stdlib only here, so it runs in any venv.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import gc
import importlib
import json
import math
import os
import sys
import time
import traceback

from bench import procmem
from bench.resp import Redis

KIND = {"W1": "noop", "W1C": "noop", "W2": "noop", "W3": "sleep", "W6": "noop", "warm": "noop"}
# W4 and W5 are runplane-only and have their own flow (bench/clients/runplane_w45.py).
SPECIAL = ("W4", "W5")


def pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return math.nan
    k = (len(sorted_vals) - 1) * p / 100.0
    f, c = math.floor(k), math.ceil(k)
    return sorted_vals[f] + (sorted_vals[c] - sorted_vals[f]) * (k - f)


async def enqueue_all(
    client, kind: str, key: str, n: int, rate: float, batch: int, conc: int, deadline: float
) -> tuple[float, float, list, int, str]:
    """Enqueue n tasks; returns (t_first, t_done, ids by index (None = failed), errors, first)."""
    ids: list = [None] * n
    errors, first_err = 0, ""
    # A sync client library (Celery's delay, Dramatiq's send) gets its calls in flight the way
    # an app using it would: from that many threads.
    pool = None
    if conc > 1 and hasattr(client, "enqueue_sync"):
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=conc)
    loop = asyncio.get_running_loop()
    t0 = time.time()

    async def one(i: int) -> None:
        nonlocal errors, first_err
        t = time.time()  # the task's t_enq: right before its enqueue call
        try:
            if pool is not None:
                ids[i] = await loop.run_in_executor(pool, client.enqueue_sync, kind, key, i, t)
            else:
                ids[i] = await client.enqueue(kind, key, i, t)
        except Exception as e:  # count, keep going: a lost task fails the run anyway
            errors += 1
            first_err = first_err or repr(e)

    if batch > 1:
        for start in range(0, n, batch):
            items = [(i, time.time()) for i in range(start, min(n, start + batch))]
            try:
                got = await client.enqueue_batch(kind, key, items)
                ids[start : start + len(got)] = got
            except Exception as e:
                errors += len(items)
                first_err = first_err or repr(e)
            if time.monotonic() > deadline:
                errors += n - start - len(items)
                break
        return t0, time.time(), ids, errors, first_err

    # conc == 1: one call at a time. conc > 1: up to conc calls in flight (a slow enqueue call
    # then doesn't lower the offered rate of a paced workload; sync client libraries still run
    # their calls one after another).
    sem = asyncio.Semaphore(max(1, conc))
    pending: set[asyncio.Task] = set()

    async def guarded(i: int) -> None:
        try:
            await one(i)
        finally:
            sem.release()

    for i in range(n):
        if rate > 0:
            delay = t0 + i / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await sem.acquire()
        if conc <= 1:
            await guarded(i)
        else:
            task = asyncio.create_task(guarded(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if (i & 255) == 0 and time.monotonic() > deadline:
            errors += n - i - 1
            first_err = first_err or "enqueue deadline exceeded"
            break
    if pending:
        await asyncio.gather(*pending)
    if pool is not None:
        pool.shutdown()
    return t0, time.time(), ids, errors, first_err


def wait_done(rec: Redis, key: str, n: int, deadline: float, stall: float) -> tuple[int, str]:
    last, last_change = -1, time.monotonic()
    while True:
        cnt = int(rec.call("LLEN", key))  # type: ignore[arg-type]
        now = time.monotonic()
        if cnt != last:
            last, last_change = cnt, now
        if cnt >= n:
            return cnt, ""
        if now > deadline:
            return cnt, f"deadline: {cnt}/{n} completed"
        if now - last_change > stall:
            return cnt, f"stalled: {cnt}/{n} completed, no progress for {stall:.0f}s"
        time.sleep(0.05)


async def special(a: argparse.Namespace) -> dict:
    """W4 / W5 (runplane only): the flow lives in bench/clients/runplane_w45.py."""
    from bench.clients import runplane_w45

    rec = Redis.from_addr(os.environ["BENCH_RECORDER"])
    mod = importlib.import_module(f"bench.clients.{os.environ['BENCH_CLIENT']}")
    client = await mod.open_client({})

    async def verify(ids: list, deadline: float, limit: int) -> dict:
        if limit <= 0:
            return {"ok": True, "checked": 0}
        step = max(1, len(ids) // limit)
        return await client.verify(ids[::step][:limit], deadline=deadline)

    try:
        fn = runplane_w45.w4 if a.workload == "W4" else runplane_w45.w5
        return await fn(a, client.c, rec, verify)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 10)
        rec.close()


async def amain(a: argparse.Namespace) -> dict:
    if a.workload in SPECIAL:
        return await special(a)
    kind = a.kind or KIND[a.workload]
    t_start_wall = time.monotonic()
    deadline = t_start_wall + a.deadline
    rec = Redis.from_addr(os.environ["BENCH_RECORDER"])
    rec.call("DEL", a.key)
    mod = importlib.import_module(f"bench.clients.{os.environ['BENCH_CLIENT']}")
    client = await mod.open_client({})
    res: dict = {"workload": a.workload, "n": a.n, "rate": a.rate, "batch": a.batch}
    # CPU per run of the system's own processes (runplane: scheduler, executor), from /proc:
    # utime + stime from the first enqueue to the last completion, so other load on the
    # machine and the verification's reads afterwards do not count.
    pids = json.loads(a.pids) if a.pids else {}
    cpu0 = procmem.cpu(pids)
    try:
        t0, t_enq_end, ids, errors, first_err = await enqueue_all(
            client, kind, a.key, a.n, a.rate, a.batch, a.concurrency, deadline
        )
        res.update(enq_errors=errors, enq_first_error=first_err)
        # a run with enqueue errors has failed already; only wait briefly to report what completed
        stall = a.stall if errors == 0 else min(a.stall, 3.0)
        _, why = wait_done(rec, a.key, a.n - errors, deadline, stall)
        cpu1 = procmem.cpu(pids)
        res["cpu_ms_per_run"] = {
            k: round((cpu1[k] - cpu0[k]) * 1000 / a.n, 3) for k in cpu1 if k in cpu0
        }
        if errors:
            why = why or "enqueue errors"
        raw = rec.call("LRANGE", a.key, 0, -1)
        rec.call("DEL", a.key)
        seen: set[int] = set()
        dups, lat, t_last_end, t_first_start = 0, [], 0.0, math.inf
        for line in raw:  # type: ignore[union-attr]
            i_s, te, ts, tend = line.split()
            i = int(i_s)
            if i in seen or not 0 <= i < a.n:
                dups += 1
                continue
            seen.add(i)
            lat.append(float(ts) - float(te))
            t_last_end = max(t_last_end, float(tend))
            t_first_start = min(t_first_start, float(ts))
        lat.sort()
        completed = len(seen)
        ok = completed == a.n and errors == 0 and not why
        enq_s = t_enq_end - t0
        e2e_s = t_last_end - t0 if completed else math.nan
        res.update(
            ok=ok,
            completed=completed,
            missing=a.n - completed,
            dups=dups,
            error=why or (f"{errors} enqueue errors: {first_err}" if errors else ""),
            enqueue_s=enq_s,
            offered_rate=a.n / enq_s if enq_s > 0 else math.nan,
            enqueue_rate=a.n / enq_s if enq_s > 0 else math.nan,
            e2e_s=e2e_s,
            e2e_rate=completed / e2e_s if completed and e2e_s > 0 else math.nan,
            first_start_s=t_first_start - t0 if completed else math.nan,
            lat_ms={p: pct(lat, float(p)) * 1000 for p in ("50", "95", "99", "100")},
            lat_mean_ms=(sum(lat) / len(lat) * 1000) if lat else math.nan,
        )
        if not ok and hasattr(client, "verify"):
            # diagnostics: what does the system itself say about the runs that never completed?
            missing = [ids[i] for i in range(a.n) if i not in seen and ids[i] is not None][:50]
            if missing:
                try:
                    v = await client.verify(missing, deadline=time.monotonic() + 2)
                    res["missing_runs"] = {"sample": missing[:5], "statuses": v.get("statuses")}
                except Exception as e:
                    res["missing_runs"] = {"sample": missing[:5], "error": repr(e)}
        if ok and hasattr(client, "verify") and a.verify_max > 0:
            ids = [x for x in ids if x is not None]
            step = max(1, len(ids) // a.verify_max)
            sample = ids[::step][: a.verify_max]
            if ids and ids[-1] not in sample:
                sample.append(ids[-1])
            v = await client.verify(sample, deadline=time.monotonic() + 60)
            res["verify"] = v
            if not v.get("ok"):
                res["ok"] = False
                res["error"] = f"system-side verification failed: {v}"
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 10)
        rec.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", required=True, choices=sorted([*KIND, *SPECIAL]))
    ap.add_argument("--kind", default="", help="task kind instead of the workload's (e.g. wait)")
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument(
        "--rate", type=float, default=0.0, help="enqueue rate/s (0 = as fast as possible)"
    )
    ap.add_argument("--batch", type=int, default=0, help="enqueue in batches of this size")
    ap.add_argument("--concurrency", type=int, default=1, help="enqueue calls in flight")
    ap.add_argument("--key", required=True)
    ap.add_argument("--deadline", type=float, default=300.0)
    ap.add_argument("--stall", type=float, default=30.0)
    ap.add_argument("--verify-max", type=int, default=0)
    ap.add_argument(
        "--pids",
        default="",
        help="JSON {name: pid} of process trees to measure (W1, W1C: CPU; W4: memory)",
    )
    ap.add_argument(
        "--mode",
        default="run",
        choices=["run", "tag", "sse-tag", "stream"],
        help="W5 subscription kind",
    )
    ap.add_argument("--tag-runs", type=int, default=10, help="W5 tag modes: runs to follow")
    ap.add_argument("--tag-rate", type=float, default=0.0, help="W5 tag modes: runs/s (0: max)")
    ap.add_argument("--chunk-rate", type=float, default=1000.0, help="W5 stream: chunks/s")
    ap.add_argument("--stream-s", type=float, default=5.0, help="W5 stream: seconds of writing")
    a = ap.parse_args()
    try:
        # W5 holds up to 10,000 streams in this one process: uvloop, as a server-side
        # subscriber of that many would run (and it is what the realtime service runs on)
        if a.workload == "W5":
            # ... and the collector tuned as the realtime service's (runplane_realtime.server):
            # 10,000 subscribers' objects, walked every few hundred deliveries by default
            gc.freeze()
            gc.set_threshold(70_000, 10, 10)
        if os.environ.get("BENCH_UVLOOP") == "1" or a.workload == "W5":
            import uvloop  # type: ignore[import-not-found]

            uvloop.install()
        res = asyncio.run(amain(a))
    except Exception as e:
        traceback.print_exc()
        res = {"ok": False, "error": f"client crashed: {e!r}", "workload": a.workload, "n": a.n}
    sys.stdout.flush()
    print(json.dumps(res, default=str))


if __name__ == "__main__":
    main()
