"""W4 (waiting runs) and W5 (realtime subscribers): runplane-only workloads (product venv).

Called by ``bench/client.py`` for ``--workload W4`` / ``W5``; returns the result dict that
``client.py`` prints as its JSON line. Completion is verified like every other workload: each run
RPUSHes one record to the recorder redis, and every index 0..N-1 must be there exactly once.

W4: N runs of ``bench-wait-token`` (batch-triggered, tagged), all waiting on ONE wait token the
client holds. Phase 1 "all waiting": the recorder list ``<key>:w`` (each run says it is about to
wait) reaches N, then the scheduler's own view — ``runs.list(status=WAITING)`` — counts N.
Memory of the executor tree (control process + task processes) and of the scheduler is sampled
from /proc (``bench/procmem.py``) before the wave, every 0.5 s during it, when all are waiting and
after all completed. Phase 2 "all resume": the client completes the token; every run resumes and
records. Memory per waiting run = (peak - before) / N.

W5 ``run`` mode: S runs of ``bench-wait-token`` wait on one token; S subscribers, one per run
(``runs.subscribe_to_run``), connect (each gets its snapshot), then the client completes the
token; every later version a subscriber receives is an event, latency = receive time - the run's
``updated_at`` (set by the scheduler when it writes the version). ``tag`` mode: S subscribers all
on one tag (``runs.subscribe_to_runs_with_tag``, the "dashboard" case); once each has seen a
marker run, R no-op runs with the tag are triggered one after another; every subscriber must see
every one of them COMPLETED (S x R x versions deliveries).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import orjson

from bench import procmem
from bench.client import pct, wait_done
from bench.procs import PROGRESS
from bench.resp import Redis
from runplane import Client, RunStatus, StreamsAPI, WaitAPI
from runplane.v1 import realtime_service_pb2 as rtpb
from runplane.v1 import realtime_service_pb2_grpc, waitpoint_service_pb2_grpc
from runplane.v1 import waitpoint_service_pb2 as wspb

WAIT_TASK = "bench-wait-token"
BATCH = 500


class Sampler(threading.Thread):
    """Samples the memory of process trees every ``interval`` s; keeps the peak per tree."""

    def __init__(self, pids: dict[str, int], interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.peak: dict[str, dict[str, int]] = {}
        self.samples = 0
        self._halt = threading.Event()

    def take(self) -> dict[str, dict[str, int]]:
        s = procmem.sample(self.pids)
        for name, m in s.items():
            p = self.peak.setdefault(name, dict(m))
            for k in ("rss_kb", "pss_kb"):
                p[k] = max(p[k], m[k])
            p["procs"] = max(p["procs"], m["procs"])
        self.samples += 1
        return s

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.take()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def _records(rec: Redis, key: str, n: int) -> tuple[set[int], int, float]:
    """(indexes seen, duplicates, latest t_end) of the records under ``key``."""
    seen: set[int] = set()
    dups, t_last = 0, 0.0
    for line in rec.call("LRANGE", key, 0, -1):  # type: ignore[union-attr]
        i_s, _te, _ts, tend = line.split()
        i = int(i_s)
        if i in seen or not 0 <= i < n:
            dups += 1
            continue
        seen.add(i)
        t_last = max(t_last, float(tend))
    return seen, dups, t_last


async def _trigger_wave(
    c: Client, key: str, n: int, token: str, tag: str
) -> tuple[list[str], float, float]:
    """Batch-trigger n waiting runs; returns (ids, t0, t_accepted)."""
    ids: list[str] = []
    t0 = time.time()
    for start in range(0, n, BATCH):
        items = [
            {
                "payload": {"k": key, "i": i, "t": time.time(), "token": token},
                "options": {"tags": [tag]},
            }
            for i in range(start, min(n, start + BATCH))
        ]
        res = await c.tasks.batch_trigger(WAIT_TASK, items)
        ids += [getattr(r, "id", r) for r in getattr(res, "runs", res)]
    return ids, t0, time.time()


async def _count_waiting(c: Client) -> int:
    """Runs the scheduler lists as WAITING. Each system has its own fresh database and nothing
    else waits there, so no tag filter: with one, ListRuns on 10,000 just-written runs took 1-3 s
    a page on PostgreSQL (stale planner statistics pick a nested loop), 20 ms without."""
    n = 0
    async for _ in c.runs.list(status="WAITING", page_size=100):
        n += 1
    return n


async def _release(c: Client, token: str, timeout: float) -> None:
    """Complete the token. The scheduler completes every wait on it in one transaction, which
    takes longer than the SDK's 30 s deadline with 10,000 waiters, so call with ``timeout``."""
    stub = waitpoint_service_pb2_grpc.WaitpointServiceStub(c.transport.channel())
    request = wspb.CompleteTokenRequest(token_id=token, data='{"go": true}')
    await c.transport.call(stub.CompleteToken, request, timeout=max(30.0, timeout))


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


async def w4(a: Any, c: Client, rec: Redis, verify: Any) -> dict[str, Any]:
    n, key = a.n, a.key
    deadline = time.monotonic() + a.deadline
    pids = {k: int(v) for k, v in json.loads(a.pids or "{}").items()}
    tag = f"w4-{time.time_ns()}"
    res: dict[str, Any] = {"workload": "W4", "n": n, "ok": False, "completed": 0}
    for k in (key, key + ":w"):
        rec.call("DEL", k)
    sampler = Sampler(pids)
    before = sampler.take()
    sampler.peak = {}
    sampler.start()
    try:
        token = (await WaitAPI(c).create_token(timeout="2h", tags=[tag])).id
        ids, t0, t_acc = await _trigger_wave(c, key, n, token, tag)
        res["trigger_s"] = t_acc - t0
        # phase 1: all waiting (the runs' own word, then the scheduler's)
        _, why = wait_done(rec, key + ":w", n, deadline, a.stall)
        if why:
            res["error"] = f"not all waiting: {why}"
            res["completed"] = int(rec.call("LLEN", key))  # type: ignore[arg-type]
            return res
        t_entered = time.time()
        waiting, polls = 0, 0
        while True:
            waiting = await _count_waiting(c)
            polls += 1
            if waiting >= n or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        t_waiting = time.time()
        at_waiting = sampler.take()
        early = int(rec.call("LLEN", key))  # type: ignore[arg-type]
        res.update(
            entered_wait_s=t_entered - t0,
            all_waiting_s=t_waiting - t0,
            scheduler_waiting=waiting,
            waiting_polls=polls,
            early_completions=early,
        )
        if waiting < n or early:
            res["error"] = f"scheduler shows {waiting}/{n} WAITING" + (
                f"; {early} completed before the release" if early else " at the deadline"
            )
            return res
        # phase 2: release; all resume and complete
        t_rel = time.time()
        await _release(c, token, deadline - time.monotonic())
        res["release_call_s"] = time.time() - t_rel
        _, why = wait_done(rec, key, n, deadline, a.stall)
        seen, dups, t_last = _records(rec, key, n)
        after = sampler.take()
        res.update(
            completed=len(seen),
            missing=n - len(seen),
            dups=dups,
            resume_s=(t_last - t_rel) if seen else math.nan,
            e2e_s=(t_last - t0) if seen else math.nan,
            error=why,
            ok=len(seen) == n and not why,
        )
    except Exception as e:  # a failed call fails the workload; keep what was measured
        res["error"] = f"{type(e).__name__}: {e}"[:400]
        return res
    finally:
        sampler.stop()
        mem: dict[str, Any] = {"before": before, "peak": sampler.peak, "samples": sampler.samples}
        with contextlib.suppress(NameError):
            mem["all_waiting"] = at_waiting  # type: ignore[possibly-undefined]
        with contextlib.suppress(NameError):
            mem["after"] = after  # type: ignore[possibly-undefined]
        res["mem"] = mem
        # per waiting run: (when all N wait - before) / N; the peak (which for the scheduler
        # comes while it resumes them all) and the memory after all completed are kept too
        for name in pids:
            b, w = before.get(name), mem.get("all_waiting", {}).get(name)
            if b and w:
                res[f"{name}_kb_per_waiting_run"] = (w["rss_kb"] - b["rss_kb"]) / n
                res[f"{name}_pss_kb_per_waiting_run"] = (w["pss_kb"] - b["pss_kb"]) / n
            mb = {
                when: _mb(mem[when][name]["rss_kb"])
                for when in ("before", "all_waiting", "peak", "after")
                if name in mem.get(when, {})
            }
            if mb:
                res[f"{name}_rss_mb"] = mb
        for k in (key, key + ":w"):
            rec.call("DEL", k)
    if res["ok"]:
        res["verify"] = v = await verify(ids, deadline=time.monotonic() + 60, limit=a.verify_max)
        if not v.get("ok"):
            res["ok"], res["error"] = False, f"system-side verification failed: {v}"
    return res


# --- W5 ---------------------------------------------------------------------------------------
FINAL = str(RunStatus.COMPLETED)


class Sub:
    """One subscriber's view: latest status per run, and the latency of each event."""

    __slots__ = ("events", "final", "first", "lat", "log")

    def __init__(self) -> None:
        self.first = 0.0  # when the subscriber received its first message (it is connected)
        self.final: dict[str, str] = {}
        # (run id, receive - updated_at) of each version produced after the subscriber was
        # connected: earlier ones (the snapshot, a backlog replayed on connecting) are not events
        self.lat: list[tuple[str, float]] = []
        self.events = 0
        self.log: list[tuple[str, int, float, float]] = []  # (status, version, recv, updated)

    def got(self, run: Any, now: float) -> None:
        updated = run.updated_at.timestamp() if run.updated_at is not None else math.nan
        self.got_fields(run.id, str(run.status), run.version, updated, now)

    def got_fields(
        self, run_id: str, status: str, version: int, updated: float, now: float
    ) -> None:
        self.events += 1
        self.final[run_id] = status
        if len(self.log) < 12:
            self.log.append((status, version, now, updated))
        if self.first and updated >= self.first:
            self.lat.append((run_id, now - updated))
        self.first = self.first or now


async def _follow_run(c: Client, run_id: str, s: Sub) -> None:
    async for run in c.runs.subscribe_to_run(run_id):
        s.got(run, time.time())


async def _follow_tag(c: Client, tag: str, s: Sub) -> None:
    async for run in c.runs.subscribe_to_runs_with_tag(tag, created_after=timedelta(minutes=10)):
        s.got(run, time.time())


async def _follow_sse(session: Any, url: str, headers: dict[str, str], s: Sub) -> None:
    """One EventSource-like client on the realtime service's SSE route: a real HTTP
    connection; each ``data:`` line is one run version (the public JSON shape)."""
    async with session.get(url, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"SSE {url}: HTTP {resp.status}: {(await resp.text())[:200]}")
        async for line in resp.content:
            if not line.startswith(b"data:"):
                continue
            now = time.time()
            run = orjson.loads(line[5:])
            stamp = run.get("updated_at")
            updated = datetime.fromisoformat(stamp).timestamp() if stamp else math.nan
            status = str(run.get("status", "")).removeprefix("RUN_STATUS_")
            s.got_fields(run["id"], status, int(run.get("version", 0)), updated, now)


async def _until(cond: Any, deadline: float, step: float = 0.1) -> bool:
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
    return True


async def _connected(
    what: str, subs: list[Any], tasks: list[asyncio.Task[None]], deadline: float, is_in: Any
) -> str:
    """Wait until every subscriber ``is_in``; reports progress every 5 s. An error (a
    subscriber task that failed, or the deadline) as text, else ""."""
    last = time.monotonic()
    while True:
        n = sum(1 for s in subs if is_in(s))
        if n == len(subs):
            return ""
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception()]
        if failed:
            return f"{len(failed)} {what} failed, the first with {failed[0].exception()!r}"[:400]
        if time.monotonic() > deadline:
            return f"only {n}/{len(subs)} {what} connected by the deadline"
        if time.monotonic() - last >= 5:
            last = time.monotonic()
            _progress(f"{n}/{len(subs)} {what} connected")
        await asyncio.sleep(0.1)


def _kb_per(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], n: int) -> dict:
    """RSS growth per subscriber of each process between two samples, KB."""
    return {
        name: round((after[name]["rss_kb"] - b["rss_kb"]) / n, 2)
        for name, b in before.items()
        if name in after and n
    }


async def _trigger_paced(c: Client, key: str, tag: str, n: int, rate: float) -> list[str]:
    """n no-op runs with the tag, one after another, or at ``rate`` per second."""
    ids: list[str] = []
    t0 = time.monotonic()
    for i in range(n):
        if rate > 0:
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        h = await c.tasks.trigger("bench-noop", {"k": key, "i": i, "t": time.time()}, tags=[tag])
        ids.append(h.id)
    return ids


async def w5(a: Any, c: Client, rec: Redis, verify: Any) -> dict[str, Any]:
    if a.mode == "stream":
        return await w5_stream(a, c, rec)
    subs_n, mode, key = a.n, a.mode, a.key
    pids = {k: int(v) for k, v in json.loads(a.pids or "{}").items()}
    pids["client"] = os.getpid()
    mem_pids = {k: v for k, v in pids.items() if k in ("realtime", "client")}
    deadline = time.monotonic() + a.deadline
    tag = f"w5{mode}-{time.time_ns()}"
    res: dict[str, Any] = {"workload": "W5", "mode": mode, "n": subs_n, "ok": False}
    for k in (key, key + ":w", key + ":m"):
        rec.call("DEL", k)
    subs = [Sub() for _ in range(subs_n)]
    tasks: list[asyncio.Task[None]] = []
    session: Any = None
    try:
        if mode == "run":
            token = (await WaitAPI(c).create_token(timeout="1h", tags=[tag])).id
            ids, _, _ = await _trigger_wave(c, key, subs_n, token, tag)
            runs_n = subs_n
            _, why = wait_done(rec, key + ":w", subs_n, deadline, a.stall)
            if why:
                res["error"] = f"runs not waiting: {why}"
                return res
            mem0 = procmem.sample(mem_pids)
            t_sub = time.time()
            _progress(f"W5 run: {subs_n} runs waiting; connecting {subs_n} subscribers")
            tasks = [
                asyncio.create_task(_follow_run(c, rid, s))
                for rid, s in zip(ids, subs, strict=True)
            ]
            why = await _connected("subscribers", subs, tasks, deadline, lambda s: s.first)
            if why:
                res["error"] = why
                return res
            res["connect_s"] = time.time() - t_sub
            await asyncio.sleep(1.0)  # let the connection bursts' garbage go before measuring
            mem1 = procmem.sample(mem_pids)
            res["kb_per_subscriber"] = _kb_per(mem0, mem1, subs_n)
            res["rss_mb"] = {
                name: {"before": _mb(mem0[name]["rss_kb"]), "subscribed": _mb(m["rss_kb"])}
                for name, m in mem1.items()
                if name in mem0
            }
            _progress(f"W5 run: all connected in {res['connect_s']:.1f} s; releasing the runs")
            t_go, cpu0 = time.time(), procmem.cpu(pids)
            await _release(c, token, deadline - time.monotonic())
            expected = [{rid} for rid in ids]
        else:
            runs_n = a.tag_runs
            t_sub = time.time()
            if mode == "sse-tag":
                import aiohttp

                base = os.environ.get("BENCH_REALTIME_HTTP", "")
                if not base:
                    res["error"] = "BENCH_REALTIME_HTTP is not set (realtime HTTP listener)"
                    return res
                after_ms = int((time.time() - 600) * 1000)
                url = f"{base}/realtime/v1/runs?tag={tag}&created_after={after_ms}"
                headers = dict(c.transport.metadata())
                headers = {"Authorization": headers["authorization"]}
                session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0),
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
                )
                tasks = [asyncio.create_task(_follow_sse(session, url, headers, s)) for s in subs]
            else:
                tasks = [asyncio.create_task(_follow_tag(c, tag, s)) for s in subs]
            # a marker run: once every subscriber has seen it, all are connected
            marker = await c.tasks.trigger(
                "bench-noop", {"k": key + ":m", "i": 0, "t": time.time()}, tags=[tag]
            )
            _progress(f"W5 {mode}: {subs_n} subscribers connecting (waiting for a marker run)")
            why = await _connected(
                "subscribers", subs, tasks, deadline, lambda s: marker.id in s.final
            )
            if why:
                res["error"] = why
                return res
            res["connect_s"] = time.time() - t_sub
            pace = f"{a.tag_rate:g}/s" if a.tag_rate > 0 else "back to back"
            _progress(f"W5 {mode}: all connected; triggering {runs_n} runs {pace}")
            t_go, cpu0 = time.time(), procmem.cpu(pids)
            ids = await _trigger_paced(c, key, tag, runs_n, a.tag_rate)
            expected = [set(ids)] * subs_n

        def saw_all(s: Sub, want: set[str]) -> bool:
            return all(s.final.get(r) == FINAL for r in want)

        await _until(
            lambda: all(saw_all(s, w) for s, w in zip(subs, expected, strict=True)),
            deadline,
            step=0.2,
        )
        t_done, cpu1 = time.time(), procmem.cpu(pids)
        _, why = wait_done(rec, key, runs_n, deadline, a.stall)
        seen, dups, _ = _records(rec, key, runs_n)
        full = sum(saw_all(s, w) for s, w in zip(subs, expected, strict=True))
        measured = set(ids)
        lat = sorted(x for s in subs for rid, x in s.lat if rid in measured)
        ok = full == subs_n and len(seen) == runs_n and not why
        res.update(
            ok=ok,
            runs=runs_n,
            tag_rate=a.tag_rate if mode != "run" else 0,
            completed=len(seen),
            dups=dups,
            saw_final=full,
            events=len(lat),
            deliveries=sum(s.events for s in subs),
            wave_s=t_done - t_go,
            # CPU seconds each process used from the release (run) / first trigger (tag) until
            # every subscriber had seen every run COMPLETED: who was busy delivering
            cpu_s={k: round(cpu1[k] - cpu0.get(k, 0.0), 2) for k in cpu1},
            lat_ms={p: pct(lat, float(p)) * 1000 for p in ("50", "95", "99", "100")},
            first_subscriber=[
                (st, v, round(r - t_go, 4), round(u - t_go, 4)) for st, v, r, u in subs[0].log
            ],
            error=why
            or (
                ""
                if full == subs_n
                else f"{subs_n - full}/{subs_n} subscribers did not see every run COMPLETED"
            ),
        )
    except Exception as e:  # a failed call fails the workload; keep what was measured
        res["error"] = f"{type(e).__name__}: {e}"[:400]
        return res
    finally:
        await _stop(tasks, res)
        if session is not None:
            await session.close()
        for k in (key, key + ":w", key + ":m"):
            rec.call("DEL", k)
    if res["ok"]:
        res["verify"] = v = await verify(ids, deadline=time.monotonic() + 60, limit=a.verify_max)
        if not v.get("ok"):
            res["ok"], res["error"] = False, f"system-side verification failed: {v}"
    return res


def _progress(msg: str) -> None:
    print(f"{PROGRESS}{msg}", file=sys.stderr, flush=True)


async def _stop(tasks: list[asyncio.Task[None]], res: dict[str, Any]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    errors = [t.exception() for t in tasks if not t.cancelled() and t.exception()]
    if errors:
        res["subscriber_errors"] = len(errors)
        res["subscriber_error"] = repr(errors[0])[:300]


# --- W5 stream ---------------------------------------------------------------------------------
STREAM_ID = "bench"
WRITE_TICK = 0.005


class Reader:
    """One stream reader: the chunks' numbers it got (-1: the marker), in order, and each
    chunk's latency."""

    __slots__ = ("indexes", "lat")

    def __init__(self) -> None:
        self.indexes: list[int] = []
        self.lat: list[float] = []


async def _read(c: Client, run_id: str, r: Reader) -> None:
    async for chunk in StreamsAPI(c).define(STREAM_ID).read(run_id):
        now = time.time()
        r.indexes.append(chunk.get("i", -1))
        if "t" in chunk:
            r.lat.append(now - chunk["t"])


async def _append(c: Client, run_id: str, chunks: list[bytes], close: bool = False) -> int:
    stub = realtime_service_pb2_grpc.RealtimeServiceStub(await c.transport.realtime_channel())
    request = rtpb.AppendStreamRequest(
        run_id=run_id, stream_id=STREAM_ID, chunks=[x.decode() for x in chunks], close=close
    )
    response = await c.transport.call(stub.AppendStream, request)
    return int(response.last_index)


async def w5_stream(a: Any, c: Client, rec: Redis) -> dict[str, Any]:
    """R readers of one run's stream; the client writes ``chunk_rate`` chunks a second for
    ``stream_s`` seconds. Each chunk carries its write time: latency = receive - write. The
    writer appends every ``WRITE_TICK`` the chunks due by then, in one AppendStream (a token
    streamer's natural batching), so the rate holds whatever one call costs."""
    readers_n, key = a.n, a.key
    pids = {k: int(v) for k, v in json.loads(a.pids or "{}").items()}
    pids["client"] = os.getpid()
    deadline = time.monotonic() + a.deadline
    total = int(a.chunk_rate * a.stream_s)
    res: dict[str, Any] = {"workload": "W5", "mode": "stream", "n": readers_n, "ok": False}
    for k in (key, key + ":w"):
        rec.call("DEL", k)
    readers = [Reader() for _ in range(readers_n)]
    tasks: list[asyncio.Task[None]] = []
    token = ""
    try:
        token = (await WaitAPI(c).create_token(timeout="1h")).id
        run = await c.tasks.trigger(WAIT_TASK, {"k": key, "i": 0, "t": time.time(), "token": token})
        _, why = wait_done(rec, key + ":w", 1, deadline, a.stall)
        if why:
            res["error"] = f"the writer's run is not waiting: {why}"
            return res
        tasks = [asyncio.create_task(_read(c, run.id, r)) for r in readers]
        # a marker chunk (index 1): once every reader has it, all are connected
        await _append(c, run.id, [b'{"marker": true}'])
        _progress(f"W5 stream: {readers_n} readers connecting")
        why = await _connected("readers", readers, tasks, deadline, lambda r: r.indexes)
        if why:
            res["error"] = why
            return res
        _progress(f"W5 stream: writing {total} chunks at {a.chunk_rate:g}/s")
        t_go, cpu0 = time.time(), procmem.cpu(pids)
        sent, calls, last, t0 = 0, 0, 1, time.monotonic()
        while sent < total:
            due = min(total, int((time.monotonic() - t0) * a.chunk_rate) + 1)
            if due > sent:
                now = time.time()
                chunks = [b'{"i":%d,"t":%.6f}' % (i, now) for i in range(sent, due)]
                last = await _append(c, run.id, chunks)
                sent, calls = due, calls + 1
            await asyncio.sleep(max(0.0, t0 + (sent + 1) / a.chunk_rate - time.monotonic()))
        write_s = time.monotonic() - t0
        await _append(c, run.id, [], close=True)
        done = await _until(lambda: all(t.done() for t in tasks), deadline, step=0.1)
        t_done, cpu1 = time.time(), procmem.cpu(pids)
        want = [-1, *range(total)]
        exact = sum(r.indexes == want for r in readers)
        lat = sorted(x for r in readers for x in r.lat)
        res.update(
            ok=done and exact == readers_n and last == total + 1,
            runs=1,
            chunks=total,
            append_calls=calls,
            write_rate=total / write_s if write_s else math.nan,
            completed=exact,
            saw_final=exact,
            events=len(lat),
            deliveries=sum(len(r.indexes) for r in readers),
            wave_s=t_done - t_go,
            cpu_s={k: round(cpu1[k] - cpu0.get(k, 0.0), 2) for k in cpu1},
            lat_ms={p: pct(lat, float(p)) * 1000 for p in ("50", "95", "99", "100")},
            error=""
            if exact == readers_n
            else f"{readers_n - exact}/{readers_n} readers did not get the marker and chunks "
            f"0..{total - 1} exactly once in order",
        )
    except Exception as e:  # a failed call fails the workload; keep what was measured
        res["error"] = f"{type(e).__name__}: {e}"[:400]
        return res
    finally:
        await _stop(tasks, res)
        if token:
            with contextlib.suppress(Exception):
                await _release(c, token, 30)
        for k in (key, key + ":w"):
            rec.call("DEL", k)
    return res
