"""Draw bench/results/latest.json as a PNG (run in the peers venv: needs matplotlib).

usage: python bench/chart.py results.json out.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    with open(src) as f:
        res = json.load(f)
    rows, cfg = res["rows"], res["meta"]["config"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.8))

    def series(wl: str, key: str):
        names, med, lo, hi, failed = [], [], [], [], []
        for name, row in rows.items():
            s = row["workloads"].get(wl)
            if not s:
                continue
            names.append(name)
            if s.get("ok") and s.get(key):
                st = s[key]
                med.append(st["median"])
                lo.append(st["median"] - st["min"])
                hi.append(st["max"] - st["median"])
                failed.append(False)
            else:
                med.append(0)
                lo.append(0)
                hi.append(0)
                failed.append(True)
        return names, med, lo, hi, failed

    def color(n: str) -> str:
        return "#d62728" if n.startswith("runplane") else "#1f77b4"

    def mark_failed(ax, xs, failed):
        for x, f in zip(xs, failed, strict=True):
            if f:
                ax.text(
                    x, 0, "FAIL", ha="center", va="bottom", color="red", fontsize=9, rotation=90
                )

    # W1
    ax = axes[0]
    names, med, lo, hi, failed = series("W1", "e2e_rate")
    _, emed, elo, ehi, _ = series("W1", "enqueue_rate")
    xs = list(range(len(names)))
    w = 0.4
    ax.bar(
        [x - w / 2 for x in xs],
        emed,
        w,
        yerr=[elo, ehi],
        label="enqueue /s",
        color="#aec7e8",
        capsize=3,
    )
    ax.bar(
        [x + w / 2 for x in xs],
        med,
        w,
        yerr=[lo, hi],
        label="end-to-end /s",
        color=[color(n) for n in names],
        capsize=3,
    )
    for x, v, f in zip(xs, med, failed, strict=True):
        if not f:
            ax.text(x + w / 2, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
    mark_failed(ax, xs, failed)
    ax.set_xticks(xs, names, rotation=30, ha="right")
    ax.set_title(f"W1 throughput ({cfg['n1']:,} no-op tasks)")
    ax.set_ylabel("tasks / s (median, min-max)")
    ax.legend(fontsize=8)
    # W2
    ax = axes[1]
    names, _, _, _, failed = series("W2", "p50_ms")
    xs = list(range(len(names)))
    w = 0.27
    for k, (p, c) in enumerate(
        (("p50_ms", "#2ca02c"), ("p95_ms", "#ff7f0e"), ("p99_ms", "#9467bd"))
    ):
        _, m, lo_, hi_, _ = series("W2", p)
        ax.bar(
            [x + (k - 1) * w for x in xs],
            [max(v, 1e-3) for v in m],
            w,
            yerr=[lo_, hi_],
            label=p[:-3],
            color=c,
            capsize=2,
        )
    _, p50, _, _, _ = series("W2", "p50_ms")
    for x, v, f in zip(xs, p50, failed, strict=True):
        if not f:
            ax.text(x - w, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    mark_failed(ax, xs, failed)
    ax.set_yscale("log")
    ax.set_xticks(xs, names, rotation=30, ha="right")
    ax.set_title(f"W2 trigger-to-start latency ({cfg['n2']:,} @ {cfg['rate2']:g}/s)")
    ax.set_ylabel("ms (log scale)")
    ax.legend(fontsize=8)
    # W3
    ax = axes[2]
    names, med, lo, hi, failed = series("W3", "e2e_s")
    xs = list(range(len(names)))
    ax.bar(xs, med, 0.6, yerr=[lo, hi], color=[color(n) for n in names], capsize=3)
    ideal = cfg["n3"] / cfg["slots3"]
    ax.axhline(ideal, ls="--", color="gray", label=f"ideal {ideal:.0f} s")
    for x, v, f in zip(xs, med, failed, strict=True):
        if not f:
            ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    mark_failed(ax, xs, failed)
    ax.set_xticks(xs, names, rotation=30, ha="right")
    ax.set_title(f"W3 capacity ({cfg['n3']:,} x 1 s, {cfg['slots3']} slots)")
    ax.set_ylabel("makespan s (lower is better)")
    ax.legend(fontsize=8)

    fig.suptitle(
        f"runplane vs peers — {res['meta']['date']} — {res['meta']['host']} — "
        f"median of <= {cfg['reps']} reps (min-max bars)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main()
