"""Summaries, the console table and the ratio table (stdlib only)."""

from __future__ import annotations

import math
import statistics
from typing import Any

PEER_ORDER = ["celery", "dramatiq", "taskiq", "procrastinate"]


def _stat(vals: list[float]) -> dict[str, float] | None:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def summarize(
    workload: str, reps: list[dict[str, Any]], ideal_s: float | None = None
) -> dict[str, Any]:
    """Medians over repetitions. A workload is ok only if every repetition completed every task."""
    ok_reps = [r for r in reps if r.get("ok")]
    failed = [r for r in reps if not r.get("ok")]
    out: dict[str, Any] = {
        "ok": bool(reps) and not failed,
        "reps": len(reps),
        "ok_reps": len(ok_reps),
    }
    if failed:
        f = failed[0]
        out["error"] = (
            f"{f.get('completed', '?')}/{f.get('n', '?')} completed; {f.get('error', '')}"
        ).strip()
    if not ok_reps:
        return out
    if workload == "W4":
        return _summarize_w4(out, ok_reps)
    if workload == "W5":
        return _summarize_w5(out, ok_reps)
    out["enqueue_rate"] = _stat([r["enqueue_rate"] for r in ok_reps])
    procs = sorted({k for r in ok_reps for k in r.get("cpu_ms_per_run", {})}, reverse=True)
    if procs:  # scheduler, executor
        out["cpu_ms_per_run"] = {
            k: _stat([r.get("cpu_ms_per_run", {}).get(k, math.nan) for r in ok_reps]) for k in procs
        }
    out["e2e_rate"] = _stat([r["e2e_rate"] for r in ok_reps])
    out["e2e_s"] = _stat([r["e2e_s"] for r in ok_reps])
    for p in ("50", "95", "99", "100"):
        out[f"p{p}_ms"] = _stat([r["lat_ms"][p] for r in ok_reps])
    out["dups"] = sum(r.get("dups", 0) for r in ok_reps)
    out["offered_rate"] = _stat([r.get("offered_rate", math.nan) for r in ok_reps])
    out["enqueue_s"] = _stat([r.get("enqueue_s", math.nan) for r in ok_reps])
    if ideal_s:
        out["ideal_s"] = ideal_s
        out["efficiency"] = _stat([ideal_s / r["e2e_s"] for r in ok_reps])
    return out


def _summarize_w4(out: dict[str, Any], ok: list[dict[str, Any]]) -> dict[str, Any]:
    for k in ("trigger_s", "all_waiting_s", "resume_s", "e2e_s", "release_call_s"):
        out[k] = _stat([r.get(k, math.nan) for r in ok])
    for name in ("executor", "scheduler"):
        out[f"{name}_kb_per_waiting_run"] = _stat(
            [r.get(f"{name}_kb_per_waiting_run", math.nan) for r in ok]
        )
        out[f"{name}_pss_kb_per_waiting_run"] = _stat(
            [r.get(f"{name}_pss_kb_per_waiting_run", math.nan) for r in ok]
        )
        for when in ("before", "all_waiting", "peak", "after"):
            out[f"{name}_rss_mb_{when}"] = _stat(
                [r.get(f"{name}_rss_mb", {}).get(when, math.nan) for r in ok]
            )
    out["dups"] = sum(r.get("dups", 0) for r in ok)
    return out


def _summarize_w5(out: dict[str, Any], ok: list[dict[str, Any]]) -> dict[str, Any]:
    for p in ("50", "95", "99", "100"):
        out[f"p{p}_ms"] = _stat([r["lat_ms"][p] for r in ok])
    for k in ("connect_s", "wave_s", "events", "saw_final", "runs"):
        out[k] = _stat([r.get(k, math.nan) for r in ok])
    for proc in ("realtime", "client", "scheduler", "nats"):
        out[f"cpu_{proc}_s"] = _stat([r.get("cpu_s", {}).get(proc, math.nan) for r in ok])
    for k in ("chunks", "append_calls", "write_rate", "deliveries"):
        out[k] = _stat([r.get(k, math.nan) for r in ok])
    for proc in ("realtime", "client"):
        out[f"{proc}_kb_per_subscriber"] = _stat(
            [r.get("kb_per_subscriber", {}).get(proc, math.nan) for r in ok]
        )
    out["mode"], out["subs"] = ok[0]["mode"], ok[0]["n"]
    out["tag_rate"] = ok[0].get("tag_rate", 0)
    out["dups"] = sum(r.get("dups", 0) for r in ok)
    return out


def _fmt(v: float, unit: str = "") -> str:
    if v >= 100:
        s = f"{v:,.0f}"
    elif v >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.2f}"
    return s + unit


def cell(st: dict[str, float] | None, unit: str = "") -> str:
    if not st:
        return "-"
    if st["n"] == 1:
        return _fmt(st["median"], unit)
    return f"{_fmt(st['median'], unit)} [{_fmt(st['min'])}-{_fmt(st['max'])}]"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w[i]) for i, h in enumerate(headers))
    out = [line, "  ".join("-" * x for x in w)]
    out += ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join(out)


def render(results: dict[str, Any]) -> str:
    meta, rows = results["meta"], results["rows"]
    cfg = meta["config"]
    parts: list[str] = []
    parts.append(
        f"runplane benchmark  {meta['date']}  ({meta['host']})  reps<={cfg['reps']}  "
        "values: median [min-max] over the reps that ran (check column)"
    )
    # W1, W1C
    body = []
    for wl in ("W1", "W1C"):
        for name, row in rows.items():
            s = row["workloads"].get(wl)
            if not s:
                continue
            inflight = f"{cfg.get('w1c_concurrency', 64)} in flight"
            label = f"{name} {'1 at a time' if wl == 'W1' else inflight}"
            if not s["ok"]:
                body.append(
                    [
                        label,
                        "FAIL",
                        "FAIL",
                        "",
                        f"{s['ok_reps']}/{s['reps']}: {s.get('error', '')[:70]}",
                    ]
                )
                continue
            cpu = s.get("cpu_ms_per_run") or {}
            body.append(
                [
                    label,
                    cell(s["enqueue_rate"]),
                    cell(s["e2e_rate"]),
                    " / ".join(f"{cell(v)}" for v in cpu.values()) if cpu else "-",
                    f"{s['ok_reps']}/{s['reps']} ok" + (f", {s['dups']} dup" if s["dups"] else ""),
                ]
            )
    if body:
        bound = meta.get("pg_fsync_per_s")
        durable = (
            f"; the durable bound of one commit at a time here (pg_test_fsync, fdatasync): "
            f"{bound:,.0f}/s"
            if bound
            else ""
        )
        parts.append(
            f"\nW1 throughput: {cfg['n1']:,} no-op tasks, one enqueue call at a time (W1C: many"
            " in flight; +batch rows: batched); CPU ms/run: scheduler / executor from /proc"
            f"{durable}\n"
            + _table(["system", "enqueue /s", "end-to-end /s", "CPU ms/run", "check"], body)
        )
    # W2
    body = []
    for name, row in rows.items():
        s = row["workloads"].get("W2")
        if not s:
            continue
        if not s["ok"]:
            body.append(
                [
                    name,
                    "FAIL",
                    "FAIL",
                    "FAIL",
                    f"{s['ok_reps']}/{s['reps']}: {s.get('error', '')[:70]}",
                ]
            )
            continue
        body.append(
            [
                name,
                cell(s["p50_ms"]),
                cell(s["p95_ms"]),
                cell(s["p99_ms"]),
                f"{s['ok_reps']}/{s['reps']} ok, max {_fmt(s['p100_ms']['median'])} ms"
                + _offered(s, cfg["rate2"]),
            ]
        )
    if body:
        parts.append(
            f"\nW2 trigger-to-start latency (ms): {cfg['n2']:,} tasks at {cfg['rate2']:g}/s,"
            " idle workers\n" + _table(["system", "p50 ms", "p95 ms", "p99 ms", "check"], body)
        )
    # W3
    body = []
    for name, row in rows.items():
        s = row["workloads"].get("W3")
        if not s:
            continue
        if not s["ok"]:
            body.append(
                [name, "FAIL", "FAIL", "", f"{s['ok_reps']}/{s['reps']}: {s.get('error', '')[:70]}"]
            )
            continue
        body.append(
            [
                name,
                cell(s["e2e_s"], " s"),
                cell(s["efficiency"]),
                cell(s.get("enqueue_s"), " s"),
                f"{s['ok_reps']}/{s['reps']} ok",
            ]
        )
    if body:
        parts.append(
            f"\nW3 capacity: {cfg['n3']:,} tasks x 1 s wait, {cfg['slots3']} slots "
            f"(ideal {cfg['n3'] / cfg['slots3']:.0f} s; +wait rows: runplane's durable "
            "wait.for_(seconds=1), which frees the slot while waiting, so they may beat the "
            "ideal; no peer equivalent)\n"
            + _table(
                ["system", "makespan", "efficiency (ideal/makespan)", "of which enqueue", "check"],
                body,
            )
        )
    # W6
    body = []
    for name, row in rows.items():
        s = row["workloads"].get("W6")
        if not s:
            continue
        if not s["ok"]:
            body.append(
                [name, "FAIL", "", f"{s['ok_reps']}/{s['reps']}: {s.get('error', '')[:70]}"]
            )
            continue
        body.append(
            [
                name,
                cell(s["enqueue_s"], " s"),
                cell(s["e2e_s"], " s"),
                f"{s['ok_reps']}/{s['reps']} ok",
            ]
        )
    if body:
        parts.append(
            "\nW6 batch: one 1,000-item batch trigger (target: accepted in <= 1 s)\n"
            + _table(["system", "accepted in", "all completed in", "check"], body)
        )
    parts += _w4(rows, cfg)
    parts += _w5(rows, cfg)
    parts.append(ratios(rows))
    if meta.get("notes"):
        parts.append("\nNotes:\n" + "\n".join(f"  {n}" for n in meta["notes"]))
    parts.append("\nWorker setup per system:")
    for name, row in rows.items():
        for prof, desc in row.get("setup", {}).items():
            parts.append(f"  {name:18s} {prof}: {desc}")
    return "\n".join(parts)


def _check(s: dict[str, Any]) -> str:
    return f"{s['ok_reps']}/{s['reps']} ok" + (f", {s['dups']} dup" if s.get("dups") else "")


def _fail(s: dict[str, Any]) -> str:
    return f"{s['ok_reps']}/{s['reps']}: {s.get('error', '')[:90]}"


def _w4(rows: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    body = []
    for name, row in rows.items():
        s = row["workloads"].get("W4")
        if not s:
            continue
        if not s["ok"]:
            body.append([name, "FAIL", "", "", "", "", "", _fail(s)])
            continue
        mem, sched = (
            " -> ".join(
                cell(s[f"{proc}_rss_mb_{when}"])
                for when in ("before", "all_waiting", "peak", "after")
            )
            for proc in ("executor", "scheduler")
        )
        body.append(
            [
                name,
                cell(s["all_waiting_s"], " s"),
                cell(s["executor_kb_per_waiting_run"], " KB"),
                mem,
                cell(s["scheduler_kb_per_waiting_run"], " KB"),
                sched,
                cell(s["resume_s"], " s"),
                _check(s),
            ]
        )
    if not body:
        return []
    return [
        f"\nW4 waiting (runplane only): {cfg.get('n4', 0):,} runs wait on one token at once, then "
        "it is completed and all resume\n"
        + _table(
            [
                "system",
                "all WAITING after",
                "executor / waiting run",
                "executor RSS MB: before -> all waiting -> peak -> after",
                "scheduler / waiting run",
                "scheduler RSS MB: before -> all waiting -> peak -> after",
                "all resumed+done in",
                "check",
            ],
            body,
        )
    ]


def _kb(st: dict[str, float] | None) -> str:
    return "-" if not st or math.isnan(st["median"]) else f"{st['median']:.1f}"


def w5_label(mode: str, subs: int, tag_rate: float = 0) -> str:
    """A W5 case (``tag@1``: 1 run a second) as the table and the chart name it."""
    mode, _, rate = mode.partition("@")
    tag_rate = float(rate) if rate else tag_rate
    if mode == "run":
        return f"{subs:,} x own run"
    if mode == "stream":
        return f"{subs:,} readers of 1 stream"
    pace = f", {tag_rate:g} run{'' if tag_rate == 1 else 's'}/s" if tag_rate else ""
    return f"{subs:,} on 1 tag{' (SSE)' if mode == 'sse-tag' else ''}{pace}"


def _w5(rows: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    body = []
    for name, row in rows.items():
        for key, s in row["workloads"].items():
            if not key.startswith("W5/"):
                continue
            _, mode, subs = key.split("/")
            what = w5_label(mode, int(subs), s.get("tag_rate", 0))
            if not s["ok"]:
                body.append([name, what, "FAIL", "", "", "", "", "", "", "", _fail(s)])
                continue
            body.append(
                [
                    name,
                    what,
                    cell(s["events"]),
                    cell(s["p50_ms"]),
                    cell(s["p99_ms"]),
                    cell(s["p100_ms"]),
                    f"{s['saw_final']['median']:.0f}/{subs}",
                    cell(s["wave_s"], " s"),
                    _kb(s.get("realtime_kb_per_subscriber")),
                    f"{cell(s['cpu_realtime_s'])} / {cell(s['cpu_nats_s'])} / "
                    f"{cell(s['cpu_client_s'])}",
                    _check(s),
                ]
            )
    if not body:
        return []
    return [
        "\nW5 realtime (runplane only): event-to-subscriber latency = receive time - the run "
        "version's updated_at (a stream chunk's write time); 'x own run': each subscriber "
        "follows its own run (all released at once); 'on 1 tag': all follow one tag, "
        f"{cfg.get('w5_tag_runs', 10)} runs; 'readers of 1 stream': "
        f"{cfg.get('w5_chunk_rate', 1000):g} chunks/s for {cfg.get('w5_stream_s', 5):g} s; "
        "events: deliveries measured; wave: release (or first trigger, first chunk) until every "
        "subscriber had everything; KB/sub: realtime RSS growth per connected subscriber; "
        "CPU s: used in the wave\n"
        + _table(
            [
                "system",
                "subscribers",
                "events",
                "p50 ms",
                "p99 ms",
                "max ms",
                "saw final",
                "wave",
                "KB/sub",
                "CPU s realtime / nats / client",
                "check",
            ],
            body,
        )
    ]


def _offered(s: dict[str, Any], target: float) -> str:
    """Flag W2 runs whose client could not offer the target rate."""
    st = s.get("offered_rate")
    if not st or st["median"] >= 0.95 * target:
        return ""
    return f", offered only {_fmt(st['median'])}/s"


def _get(rows: dict, name: str, wl: str, key: str) -> float | None:
    s = rows.get(name, {}).get("workloads", {}).get(wl)
    if not s or not s.get("ok") or not s.get(key):
        return None
    return s[key]["median"]


def ratios(rows: dict[str, Any]) -> str:
    # +wait rows (a durable wait that frees the slot) have no like-for-like peer
    subjects = [n for n in rows if n.startswith("runplane") and not n.endswith("+wait")]
    peers = [n for n in rows if not n.startswith("runplane")]
    note = "runplane / peer"
    if not any(_get(rows, s, "W1", "e2e_rate") or _get(rows, s, "W2", "p50_ms") for s in subjects):
        if not peers:
            return ""
        subjects, peers = [peers[0]], peers[1:]
        note = f"no runplane results; {subjects[0]} / peer instead"
    metrics = [
        ("W1", "e2e_rate", "W1 e2e/s (>1 better)"),
        ("W1", "enqueue_rate", "W1 enqueue/s (>1 better)"),
        ("W1C", "e2e_rate", "W1C e2e/s (>1 better)"),
        ("W2", "p50_ms", "W2 p50 (<1 better)"),
        ("W2", "p99_ms", "W2 p99 (<1 better)"),
        ("W3", "e2e_s", "W3 makespan (<1 better)"),
    ]
    body = []
    for s in subjects:
        for p in peers:
            r = [f"{s} vs {p}"]
            for wl, key, _ in metrics:
                a, b = _get(rows, s, wl, key), _get(rows, p, wl, key)
                r.append(f"{a / b:.2f}x" if a and b else "-")
            body.append(r)
    if not body:
        return ""
    return f"\nRatios ({note}, medians)\n" + _table(["pair"] + [m[2] for m in metrics], body)
