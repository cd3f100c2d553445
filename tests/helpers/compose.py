"""What deploy/compose.yaml describes, started as local processes: each service's command and
environment as its container would have them (the image's ENV, the env files made from the
examples, the service's own environment), with every ``host:port`` of a service rewritten to a
free loopback port, started in depends_on order and waited on by their own healthchecks.

A network alias several services share (the scheduler replicas' ``scheduler``) resolves to all
of them in Compose: as a whole setting value (a gRPC target) it becomes gRPC's address list,
``ipv4:127.0.0.1:P1,127.0.0.1:P2``, whose addresses a channel tries in turn as it would the A
records of the name; inside a URL (HTTP) it becomes the first service's address."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers.cluster import ServiceProcess
from tests.helpers.deploy import (
    DEPLOY,
    DOCKERFILE,
    ENV_FILE_EXAMPLES,
    EXAMPLE_DIR,
    ROOT,
    env_file,
    env_files,
    environment,
    exec_form,
    healthcheck_url,
    image_env,
)
from tests.helpers.nats import NatsServer
from tests.helpers.ports import free_port

LOOPBACK = "127.0.0.1"
LOCAL_HOSTS = ("0.0.0.0", "127.0.0.1", "localhost")
HEALTHY_TIMEOUT = 90.0
# The options of a nats-server node that NatsServer sets itself.
NATS_OWN_OPTIONS = ("--jetstream", "--store_dir", "--port")


class LoopbackPorts:
    """One free loopback port per (service, container port), the same wherever it is named.
    ``aliases``: each network alias and the services that answer to it, in order."""

    def __init__(self, services: set[str], aliases: dict[str, list[str]] | None = None) -> None:
        self.services = services
        self.aliases = aliases or {}
        self.ports: dict[tuple[str, int], int] = {}

    def port(self, service: str, port: int) -> int:
        if (service, port) not in self.ports:
            self.ports[service, port] = free_port(LOOPBACK)
        return self.ports[service, port]

    def rewrite(self, text: str, service: str) -> str:
        """``text`` with each ``host:port`` of a service (or, for ``service``'s own addresses,
        ``0.0.0.0``/``127.0.0.1``/``localhost``) as its loopback address. A whole ``alias:port``
        becomes the gRPC address list of the alias's services; in a URL, the first one's."""
        whole = re.fullmatch(r"(?P<host>[A-Za-z0-9_.-]+):(?P<port>\d+)", text)
        if whole and whole.group("host") in self.aliases:
            port = int(whole.group("port"))
            targets = self.aliases[whole.group("host")]
            return "ipv4:" + ",".join(f"{LOOPBACK}:{self.port(t, port)}" for t in targets)

        def local(match: re.Match[str]) -> str:
            host, port = match.group("host"), int(match.group("port"))
            target = service if host in LOCAL_HOSTS else host
            target = self.aliases.get(target, [target])[0]
            if target not in self.services:
                return match.group(0)
            return f"{LOOPBACK}:{self.port(target, port)}"

        return re.sub(r"(?P<host>[A-Za-z0-9_.-]+):(?P<port>\d+)\b", local, text)


def network_aliases(services: dict[str, Any]) -> dict[str, list[str]]:
    """Each network alias (``networks: {NET: {aliases: [...]}}``) and the services with it."""
    aliases: dict[str, list[str]] = {}
    for name, service in services.items():
        networks = service.get("networks") or {}
        if isinstance(networks, list):  # the short form names networks and gives no aliases
            continue
        for network in networks.values():
            for alias in (network or {}).get("aliases", []):
                assert alias not in services, f"alias {alias} is also a service's name"
                aliases.setdefault(alias, []).append(name)
    return aliases


def start_order(services: dict[str, Any]) -> list[str]:
    """The services, each after those it depends on."""
    order: list[str] = []
    while len(order) < len(services):
        ready = sorted(
            name
            for name, service in services.items()
            if name not in order and set(service.get("depends_on", {})) <= set(order)
        )
        if not ready:
            raise AssertionError(f"depends_on cycle among {set(services) - set(order)}")
        order.extend(ready)
    return order


class ComposeProcesses:
    """compose.yaml's services as processes. ``database_url`` stands in for the ``postgres``
    service (a fresh database); keys are made by running the ``migrate`` service's image with
    ``keys create``, as deploy/README.md says to."""

    def __init__(
        self, compose: dict[str, Any], tmp: Path, database_url: str, nats_binary: str
    ) -> None:
        self.services: dict[str, Any] = compose["services"]
        self.tmp = tmp
        self.database_url = database_url
        self.nats_binary = nats_binary
        self.ports = LoopbackPorts(set(self.services), network_aliases(self.services))
        self.nats: dict[str, NatsServer] = {}
        self.processes: dict[str, ServiceProcess] = {}
        self.keys: dict[str, str] = {}
        self._healthy: set[str] = set()
        entrypoint = exec_form(DOCKERFILE, "ENTRYPOINT")
        assert entrypoint == ["runplane"], entrypoint
        # The image's `runplane` is this checkout's CLI.
        self.entrypoint = [sys.executable, "-m", "runplane_cli"]

    # -- what a container of each service would see ------------------------------------------

    def env(self, name: str) -> dict[str, str]:
        service = self.services[name]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPLANE_")}
        # The image installs the wheel; the task image puts its module on /app (PYTHONPATH).
        paths = [ROOT / "sdk", ROOT / "services", ROOT, EXAMPLE_DIR]
        env.update(PYTHONPATH=os.pathsep.join(map(str, paths)), PYTHONUNBUFFERED="1")
        container = {k: v for k, v in image_env(DOCKERFILE).items() if k.startswith("RUNPLANE_")}
        for file in env_files(service):
            container.update(env_file(DEPLOY / ENV_FILE_EXAMPLES[file]))
        container.update(environment(service))
        for key, value in container.items():
            env[key] = self.ports.rewrite(value, name)
        if "RUNPLANE_DATABASE_URL" in env:
            assert "@postgres:5432/" in container["RUNPLANE_DATABASE_URL"]
            env["RUNPLANE_DATABASE_URL"] = self.database_url
        if "RUNPLANE_WORKER_KEY" in env:
            env["RUNPLANE_WORKER_KEY"] = self.key("worker")
            env["RUNPLANE_SECRET_KEY"] = self.key("secret")
        return env

    def argv(self, name: str) -> list[str]:
        return [*self.entrypoint, *self.services[name]["command"]]

    def key(self, kind: str) -> str:
        """``docker compose run --rm migrate keys create --env prod [--kind worker]``."""
        if kind not in self.keys:
            command = ["keys", "create", "--env", "prod", "--kind", kind]
            result = subprocess.run(
                [*self.entrypoint, *command],
                env=self.env("migrate"),
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            self.keys[kind] = result.stdout.strip()
        return self.keys[kind]

    # -- starting and waiting ----------------------------------------------------------------

    async def up(self) -> None:
        """Start every service once what it depends on is in the state depends_on asks for."""
        for name in start_order(self.services):
            for dependency, spec in self.services[name].get("depends_on", {}).items():
                condition = spec["condition"]
                if condition == "service_healthy":
                    await self.wait_healthy(dependency)
                elif condition == "service_completed_successfully":
                    await self.wait_completed(dependency)
            await self.start(name)
        for name in self.services:
            if "healthcheck" in self.services[name]:
                await self.wait_healthy(name)

    async def start(self, name: str) -> None:
        if name == "postgres":
            return  # database_url is its database
        if name.startswith("nats"):
            await self.start_nats(name)
            return
        process = ServiceProcess(name, self.argv(name), self.env(name), self.tmp)
        self.processes[name] = process
        process.start()

    async def start_nats(self, name: str) -> None:
        options = dict(a.partition("=")[::2] for a in self.services[name]["command"])
        assert all(option in options for option in NATS_OWN_OPTIONS), options
        args = []
        for option, value in options.items():
            if option in NATS_OWN_OPTIONS:
                continue
            if option == "--http_port":
                value = str(self.ports.port(name, int(value)))
            args.append(f"{option}={self.ports.rewrite(value, name)}")
        server = NatsServer(
            self.tmp / name,
            port=self.ports.port(name, int(options["--port"])),
            binary=self.nats_binary,
            args=args,
        )
        self.nats[name] = server
        await server.start()

    async def wait_completed(self, name: str) -> None:
        process = self.processes[name].process
        assert process is not None
        code = await asyncio.wait_for(asyncio.to_thread(process.wait), HEALTHY_TIMEOUT)
        assert code == 0, f"{name} exited {code}:\n{self.processes[name].log()}"

    async def wait_healthy(self, name: str) -> None:
        """Until the service's healthcheck passes (postgres: its database exists)."""
        if name in self._healthy or name == "postgres":
            return
        test = self.services[name]["healthcheck"]["test"]
        deadline = time.monotonic() + HEALTHY_TIMEOUT
        while not await self.check(name, test):
            process = self.processes.get(name)
            if process is not None and process.process and process.process.poll() is not None:
                raise AssertionError(f"{name} exited while starting:\n{process.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not healthy after {HEALTHY_TIMEOUT:g}s: {test}")
            await asyncio.sleep(0.2)
        self._healthy.add(name)

    async def check(self, name: str, test: list[str]) -> bool:
        kind, program, *args = test
        if program == "python":  # the runplane image's own check, run by this Python
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *(self.ports.rewrite(a, name) for a in args),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            return await proc.wait() == 0
        assert (kind, program) == ("CMD", "wget"), test  # nats: an HTTP GET
        url = self.ports.rewrite(healthcheck_url(test), name)
        try:
            await asyncio.to_thread(urllib.request.urlopen, url, timeout=2)
        except OSError:
            return False
        return True

    async def restart(self, name: str) -> None:
        """Start a stopped service again (its restart policy) and wait on its healthcheck."""
        self._healthy.discard(name)
        self.processes[name].start()
        await self.wait_healthy(name)

    async def down(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.processes.values()))
        for server in self.nats.values():
            await server.stop()

    def logs(self) -> str:
        parts = [f"===== {n}\n{p.log()[-6000:]}" for n, p in self.processes.items()]
        parts += [f"===== {n}\n{s.log_tail(30)}" for n, s in self.nats.items()]
        return "\n".join(parts)
