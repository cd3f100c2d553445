"""Brokers and databases the benchmark starts for itself, on free loopback ports."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from pathlib import Path

from bench import procs
from bench.resp import Redis


class BrokerError(RuntimeError):
    pass


def which(*cands: str) -> str | None:
    for c in cands:
        if os.path.isabs(c) and os.access(c, os.X_OK):
            return c
        p = shutil.which(c)
        if p:
            return p
    return None


class RedisServer:
    def __init__(self, name: str, workdir: Path) -> None:
        self.name, self.workdir = name, workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = which("redis-server", "/usr/bin/redis-server")
        if not exe:
            raise BrokerError("redis-server not found (apt-get install -y redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self.port = procs.free_port()
            self.proc = procs.spawn(
                f"redis:{self.name}",
                [
                    exe,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--daemonize",
                    "no",
                    "--protected-mode",
                    "yes",
                    "--loglevel",
                    "warning",
                ],
                log_path=self.workdir / f"redis-{self.name}.log",
            )
            if procs.wait_port(self.port, 10, self.proc):
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    try:
                        r = Redis("127.0.0.1", self.port, 2)
                        ok = r.call("PING") == "PONG"
                        r.close()
                        if ok:
                            return self
                    except OSError:
                        pass
                    time.sleep(0.05)
            procs.stop(self.proc)
        raise BrokerError(f"redis-server for {self.name} did not start")

    def stop(self) -> None:
        if self.proc:
            procs.stop(self.proc)
            self.proc = None


class NatsServer:
    def __init__(self, name: str, workdir: Path) -> None:
        self.name, self.workdir = name, workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        exe = which("/usr/sbin/nats-server", "nats-server")
        if not exe:
            raise BrokerError("nats-server not found (apt-get install -y nats-server)")
        sd = self.workdir / f"js-{self.name}"
        sd.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self.port = procs.free_port()
            self.proc = procs.spawn(
                f"nats:{self.name}",
                [exe, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(sd)],
                log_path=self.workdir / f"nats-{self.name}.log",
            )
            if procs.wait_port(self.port, 10, self.proc):
                return self
            procs.stop(self.proc)
        raise BrokerError(f"nats-server for {self.name} did not start")

    def stop(self) -> None:
        if self.proc:
            procs.stop(self.proc)
            self.proc = None


class Postgres:
    """A PostgreSQL server to create per-run databases in.

    Uses the server at 127.0.0.1:5432 (trust, user postgres) if it answers; otherwise
    initdb's a throwaway cluster on a free port (needs the postgresql server package).
    """

    def __init__(
        self, workdir: Path, host: str = "127.0.0.1", port: int = 5432, user: str = "postgres"
    ) -> None:
        self.workdir, self.host, self.port, self.user = workdir, host, port, user
        self.own_proc_datadir: Path | None = None
        self.psql = which("psql") or "psql"

    def _psql(
        self, sql: str, db: str = "postgres", timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return procs.run(
            [
                self.psql,
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-qAtc",
                sql,
            ],
            timeout=timeout,
            env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
        )

    def available(self) -> bool:
        return self._psql("select 1", timeout=10).returncode == 0

    def start(self) -> Postgres:
        if self.available():
            procs.log(f"postgres: using existing server {self.host}:{self.port}")
            return self
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            raise BrokerError(
                f"no PostgreSQL at {self.host}:{self.port} and no initdb to start one"
            )
        pgbin = Path(bins[-1]).parent
        root = self.workdir / "pg"
        root.mkdir(parents=True, exist_ok=True)
        as_pg: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
            as_pg = ["runuser", "-u", "postgres", "--"]
        r = procs.run(
            [
                *as_pg,
                str(pgbin / "initdb"),
                "-D",
                str(root / "data"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            timeout=120,
        )
        if r.returncode != 0:
            raise BrokerError(f"initdb failed: {r.stderr[-500:]}")
        self.port = procs.free_port()
        r = procs.run(
            [
                *as_pg,
                str(pgbin / "pg_ctl"),
                "-D",
                str(root / "data"),
                "-l",
                str(root / "pg.log"),
                "-o",
                f"-p {self.port} -k {root} -c listen_addresses=127.0.0.1",
                "-w",
                "start",
            ],
            timeout=120,
        )
        if r.returncode != 0:
            raise BrokerError(f"pg_ctl start failed: {r.stderr[-500:]}")
        self.own_proc_datadir = root / "data"
        self._as_pg, self._pgbin = as_pg, pgbin
        procs.log(f"postgres: started own cluster on 127.0.0.1:{self.port}")
        return self

    def create_db(self, name: str) -> str:
        self._psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        r = self._psql(f'CREATE DATABASE "{name}"')
        if r.returncode != 0:
            raise BrokerError(f"create database {name} failed: {r.stderr.strip()}")
        return name

    def drop_db(self, name: str) -> None:
        r = self._psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if r.returncode != 0:
            procs.log(f"warning: drop database {name} failed: {r.stderr.strip()}")

    def conninfo(self, db: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{db}"

    def stop(self) -> None:
        if self.own_proc_datadir is not None:
            procs.run(
                [
                    *self._as_pg,
                    str(self._pgbin / "pg_ctl"),
                    "-D",
                    str(self.own_proc_datadir),
                    "-m",
                    "fast",
                    "-w",
                    "stop",
                ],
                timeout=60,
            )
            self.own_proc_datadir = None
