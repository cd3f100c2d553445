"""A tiny, dependency-free Redis (RESP2) client.

Used by the completion recorder inside every benchmarked task (in both the peers venv and
the product venv, so it must be stdlib-only), by the benchmark clients to wait for
completions, and by the orchestrator to check that redis-server is up.
"""

from __future__ import annotations

import socket


class RespError(Exception):
    pass


def _encode(*args: object) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class Redis:
    """Blocking single-connection client. Not thread-safe: use one per thread."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.sock.makefile("rb")

    @classmethod
    def from_addr(cls, addr: str, timeout: float = 10.0) -> Redis:
        host, port = addr.rsplit(":", 1)
        return cls(host, int(port), timeout)

    def close(self) -> None:
        try:
            self.f.close()
        finally:
            self.sock.close()

    def _read(self) -> object:
        line = self.f.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self._read() for _ in range(n)]
        raise RespError(f"bad reply {line!r}")

    def call(self, *args: object) -> object:
        self.sock.sendall(_encode(*args))
        return self._read()
