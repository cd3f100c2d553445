"""Memory of a process tree from /proc (stdlib only; Linux).

``tree_mem(pid)`` sums, over ``pid`` and all its descendants (found through
``/proc/<pid>/task/*/children``), the resident set (``VmRSS`` in ``/proc/<pid>/status``) and the
proportional set (``Pss`` in ``/proc/<pid>/smaps_rollup``, which splits pages shared between
processes, e.g. a forked pool, among them). Values are KiB. A process that exits while it is
read is skipped.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for t in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(x) for x in (t / "children").read_text().split()]
    return out


def descendants(pid: int) -> list[int]:
    """pid and every process below it."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo += children(p)
    return seen


def _field(path: str, name: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])  # "VmRSS:   12345 kB"
    return None


def tree_mem(pid: int) -> dict[str, int]:
    """{"rss_kb", "pss_kb", "procs"} of pid and its descendants (zeros if pid is gone)."""
    rss = pss = n = 0
    for p in descendants(pid):
        r = _field(f"/proc/{p}/status", "VmRSS")
        if r is None:
            continue
        n += 1
        rss += r
        pss += _field(f"/proc/{p}/smaps_rollup", "Pss") or r
    return {"rss_kb": rss, "pss_kb": pss, "procs": n}


def sample(pids: dict[str, int]) -> dict[str, dict[str, int]]:
    return {name: tree_mem(pid) for name, pid in pids.items()}


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by pid and its live descendants."""
    total = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def cpu(pids: dict[str, int]) -> dict[str, float]:
    return {name: tree_cpu(pid) for name, pid in pids.items()}
