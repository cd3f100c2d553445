"""Draw bench/results/latest.json as a PNG (run in the peers venv: needs matplotlib).

usage: python bench/chart.py results.json out.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Run as a script (bench/ is on sys.path): the table's names for the W5 cases, stdlib only.
from report import w5_label


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    with open(src) as f:
        res = json.load(f)
    rows, cfg = res["rows"], res["meta"]["config"]
    w5 = [
        (name, key, s)
        for name, row in rows.items()
        for key, s in row["workloads"].items()
        if key.startswith("W5/")
    ]
    w4 = [(name, row["workloads"]["W4"]) for name, row in rows.items() if "W4" in row["workloads"]]
    extra = bool(w5 or w4)
    fig, axes = plt.subplots(1, 4 if extra else 3, figsize=(22 if extra else 17, 5.8))

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

    if extra:
        # W5 p50/p99 per case (runplane only), with W4's memory per waiting run as a note
        ax = axes[3]
        labels, p50, p99, fails = [], [], [], []
        for name, key, st in w5:
            _, mode, subs = key.split("/")
            case = w5_label(mode, int(subs), st.get("tag_rate", 0))
            labels.append(f"{name.removeprefix('runplane-')} {case}")
            good = st.get("ok") and st.get("p50_ms")
            p50.append(st["p50_ms"]["median"] if good else 0)
            p99.append(st["p99_ms"]["median"] if good else 0)
            fails.append(not good)
        xs = list(range(len(labels)))
        w = 0.4
        ax.bar(
            [x - w / 2 for x in xs], [max(v, 1e-3) for v in p50], w, label="p50", color="#2ca02c"
        )
        ax.bar(
            [x + w / 2 for x in xs], [max(v, 1e-3) for v in p99], w, label="p99", color="#9467bd"
        )
        for x, v, f in zip(xs, p99, fails, strict=True):
            if not f:
                ax.text(x + w / 2, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
        mark_failed(ax, xs, fails)
        if labels:
            ax.set_yscale("log")
        ax.set_xticks(xs, labels, rotation=30, ha="right")
        ax.set_title("W5 realtime: event-to-subscriber latency (runplane only)")
        ax.set_ylabel("ms (log scale)")
        ax.legend(fontsize=8, loc="upper left")
        note = []
        for name, st in w4:
            if st.get("ok"):
                note.append(
                    f"W4 {name}: {cfg.get('n4', 0):,} waiting, "
                    f"{st['executor_kb_per_waiting_run']['median']:.1f} KB/run executor, "
                    f"{st['scheduler_kb_per_waiting_run']['median']:.1f} KB/run scheduler"
                )
            else:
                note.append(f"W4 {name}: FAIL")
        if note:  # W4 has no panel of its own: its memory per waiting run under the title
            ax.set_title(
                "W5 realtime: event-to-subscriber latency (runplane only)\n" + "\n".join(note),
                fontsize=9,
            )

    fig.suptitle(
        f"runplane vs peers — {res['meta']['date']} — {res['meta']['host']} — "
        f"median of <= {cfg['reps']} reps (min-max bars)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main()
