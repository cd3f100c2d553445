"""Process bookkeeping for the benchmark orchestrator (stdlib only).

Every process is started in its own session (process group == its pid) and registered;
``stop_all()`` (called from ``finally``, atexit and signal handlers) sends SIGTERM to each
registered group, waits, then SIGKILLs what is left. Only processes this run started are
ever signalled, by their own ids.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_procs: list[tuple[str, subprocess.Popen[bytes]]] = []
T0 = time.monotonic()


def log(msg: str) -> None:
    el = time.monotonic() - T0
    print(f"[{int(el // 60):02d}:{el % 60:04.1f}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.05)
    return False


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    log_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-running process in its own process group, output to log_path."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        p = subprocess.Popen(
            list(argv),
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]
    _procs.append((name, p))
    return p


def stop(p: subprocess.Popen[bytes], grace: float = 8.0) -> None:
    """SIGTERM the process group of p (p was started as a session leader), then SIGKILL."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(grace)
    # the group may still have children (e.g. celery prefork) even if the leader exited
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(5)
    for i, (_, q) in enumerate(_procs):
        if q is p:
            del _procs[i]
            break


def stop_all() -> None:
    while _procs:
        name, p = _procs[-1]
        try:
            stop(p, grace=5.0)
        except Exception as e:  # pragma: no cover - best effort
            print(f"warning: could not stop {name} (pid {p.pid}): {e}", file=sys.stderr)
            _procs.pop()


def run(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 120.0,
    progress: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion in its own group; kill the group on timeout.
    ``progress`` gets each stderr line that starts with ``PROGRESS`` as it comes."""
    p = subprocess.Popen(
        list(argv),
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    _procs.append((argv[0], p))  # type: ignore[arg-type]
    echo = _Echo(p, progress) if progress is not None else None
    try:
        if echo is not None:
            out, err = echo.communicate(timeout)
        else:
            out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(p, grace=2.0)  # type: ignore[arg-type]
        out, err = echo.communicate(None) if echo is not None else p.communicate()
        return subprocess.CompletedProcess(
            list(argv), -999, out, (err or "") + f"\n<timeout after {timeout:.0f}s>"
        )
    except BaseException:  # Ctrl-C / SIGTERM while waiting: the child must not outlive us
        stop(p, grace=1.0)  # type: ignore[arg-type]
        raise
    finally:
        for i, (_, q) in enumerate(_procs):
            if q is p:
                del _procs[i]
                break
    return subprocess.CompletedProcess(list(argv), p.returncode, out, err)


PROGRESS = "  [client] "


class _Echo:
    """Reads a child's stdout and stderr in threads, passing its progress lines on as they
    come."""

    def __init__(self, p: subprocess.Popen[str], progress: Callable[[str], None]) -> None:
        self.p, self.progress = p, progress
        self.out: list[str] = []
        self.err: list[str] = []
        self.threads = [
            threading.Thread(target=self._pump_out, daemon=True),
            threading.Thread(target=self._pump_err, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _pump_out(self) -> None:
        assert self.p.stdout is not None
        self.out.append(self.p.stdout.read())

    def _pump_err(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.err.append(line)
            if line.startswith(PROGRESS):
                self.progress(line[len(PROGRESS) :].rstrip())

    def communicate(self, timeout: float | None) -> tuple[str, str]:
        """Like Popen.communicate: raises TimeoutExpired if the child is still running."""
        self.p.wait(timeout=timeout)
        for t in self.threads:
            t.join(5)
        return "".join(self.out), "".join(self.err)


def tail(path: Path | None, n: int = 15) -> str:
    if not path or not path.exists():
        return ""
    lines = path.read_text(errors="replace").splitlines()[-n:]
    return "\n".join("      | " + ln for ln in lines)
