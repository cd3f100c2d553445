"""Free TCP ports on the loopback interface.

Ports come from 20000-31999, below the kernel's ephemeral range (32768-60999 on Linux), so an
outgoing connection never takes one between the check and the bind. Each pytest-xdist worker
hands out its own slice of that range, one port after another, so parallel workers never race
for the same port.
"""

from __future__ import annotations

import itertools
import os
import random
import socket

_BASE, _SIZE = 20000, 12000


def _slice() -> tuple[int, int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker) if worker.isdigit() else 0
    width = _SIZE // max(count, 1)
    return _BASE + index * width, width


_start, _width = _slice()
_next = itertools.count(random.randrange(_width))


def _is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now, from this worker's slice.

    A process outside the tests may still take it before the caller binds it; servers started
    on it should be retried on a new port when the bind fails (``NatsServer`` does).
    """
    for _ in range(_width):
        port = _start + next(_next) % _width
        if _is_free(host, port):
            return port
    raise RuntimeError(f"no free port in {_start}..{_start + _width - 1}")
