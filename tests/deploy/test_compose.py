"""deploy/compose.yaml's structure: valid against the Compose specification (the Rust
``compose_spec`` parser, through the ``compose-spec`` package); the services issue 15 lists,
each with its image, command, environment and healthcheck; two scheduler replicas behind one
network alias, each with its own name and advertised address; start order by depends_on
conditions; secrets only in the env files, which are git-ignored and made from the committed
examples."""

from __future__ import annotations

import copy
import importlib
import json
import subprocess
from types import ModuleType
from typing import Any

import pytest

from tests.helpers.compose import LoopbackPorts, network_aliases
from tests.helpers.deploy import (
    DEPLOY,
    DOCKERFILE,
    ENV_FILE_EXAMPLES,
    ROOT,
    env_file,
    env_files,
    environment,
    healthcheck_url,
    image_env,
    load_compose,
)
from tests.helpers.unavailable import unavailable

NATS = ("nats-1", "nats-2", "nats-3")
SCHEDULERS = ("scheduler-1", "scheduler-2")
RUNPLANE = ("migrate", *SCHEDULERS, "executor-1", "executor-2", "realtime", "dashboard")
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
# What a service's healthcheck URL must reach: its HTTP port in the image (the Dockerfile's ENV).
HTTP_PORT_SETTING = {
    "scheduler-1": "RUNPLANE_SCHEDULER_HTTP_LISTEN",
    "scheduler-2": "RUNPLANE_SCHEDULER_HTTP_LISTEN",
    "executor-1": "RUNPLANE_EXECUTOR_HTTP_LISTEN",
    "executor-2": "RUNPLANE_EXECUTOR_HTTP_LISTEN",
    "realtime": "RUNPLANE_REALTIME_HTTP_LISTEN",
    "dashboard": "RUNPLANE_DASHBOARD_LISTEN",
}


def services() -> dict[str, Any]:
    found: dict[str, Any] = load_compose()["services"]
    return found


@pytest.fixture(scope="module")
def compose_spec() -> ModuleType:
    try:
        return importlib.import_module("compose_spec")
    except ImportError as error:
        unavailable(f"compose-spec is not installed ({error}): run `make setup`")


def parse(compose_spec: ModuleType, compose: dict[str, Any]) -> Any:
    """The spec's parser over the file as Compose reads it (YAML merge keys resolved)."""
    return compose_spec.PyCompose.from_json(json.dumps(compose))


def test_it_is_valid_compose(compose_spec: ModuleType) -> None:
    parsed = parse(compose_spec, load_compose())
    assert set(parsed.service_names()) == set(services())


@pytest.mark.parametrize(
    ("where", "key", "value", "error"),
    [
        (("services", "scheduler-1"), "healtcheck", {"test": ["CMD", "true"]}, "healtcheck"),
        (("services", "scheduler-1", "healthcheck"), "interval", "5 sec", "duration unit"),
        (("services", "scheduler-2", "networks", "default"), "alias", ["scheduler"], "alias"),
        (
            ("services", "realtime", "depends_on", "scheduler-1"),
            "condition",
            "service_ready",
            "unknown variant",
        ),
    ],
)
def test_the_spec_check_refuses_a_broken_file(
    compose_spec: ModuleType, where: tuple[str, ...], key: str, value: Any, error: str
) -> None:
    """The check above can fail: a misspelt key, a bad duration, an unknown condition."""
    broken = copy.deepcopy(load_compose())
    node = broken
    for name in where:
        node = node[name]
    node[key] = value
    with pytest.raises(ValueError, match=error):
        parse(compose_spec, broken)


def test_it_has_the_services_issue_15_lists() -> None:
    assert set(services()) == {"postgres", *NATS, *RUNPLANE}


def test_every_service_has_an_image_command_and_healthcheck() -> None:
    for name, service in services().items():
        assert service.get("image"), name
        if name == "postgres":
            continue
        assert service.get("command"), name
        if name != "migrate":  # a one-shot job: its exit code is its health
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name


def test_runplane_services_run_the_image_with_a_service_command() -> None:
    for name in RUNPLANE:
        service = services()[name]
        command = service["command"]
        assert command[0] == {"migrate": "db"}.get(name, name.split("-")[0]), name
        env = environment(service)
        # RUNPLANE_NATS_URL names every node of the cluster; streams keep 3 replicas.
        nodes = env["RUNPLANE_NATS_URL"].split(",")
        assert [n.split("//")[1].split(":")[0] for n in nodes] == list(NATS), name
        assert env["RUNPLANE_NATS_REPLICAS"] == "3", name
    assert services()["migrate"]["command"] == ["db", "upgrade"]


def test_scheduler_replicas_share_an_alias_with_their_own_names_and_addresses() -> None:
    """Two schedulers on one database: one leads, the other stands by and forwards to the
    address the leader advertises (its own service name, never the shared alias)."""
    all_services = services()
    schedulers = {
        n: s for n, s in all_services.items() if s.get("command", [None])[0] == "scheduler"
    }
    assert set(schedulers) == set(SCHEDULERS)
    host_ports = set()
    for name, service in schedulers.items():
        assert service.get("deploy", {}).get("replicas", 1) == 1, name  # named copies instead
        assert service["networks"]["default"]["aliases"] == ["scheduler"], name
        env = environment(service)
        assert env["RUNPLANE_REPLICA_ID"] == name
        assert env["RUNPLANE_ADVERTISE"] == f"{name}:7070"
        # The leader's wait-token endpoint, where a standby forwards a POST it is sent.
        assert env["RUNPLANE_SCHEDULER_HTTP_URL"] == f"http://{name}:7074"
        assert service["env_file"] == ["runplane.env"], name  # RUNPLANE_DATABASE_URL
        # Crash-only: a leader that lost its lease exits non-zero and comes back as a standby.
        assert service["restart"] in ("always", "unless-stopped", "on-failure"), name
        (mapping,) = service["ports"]
        host, _, container = mapping.rpartition(":")
        assert container == "7070" and host.startswith("127.0.0.1:"), (name, mapping)
        host_ports.add(host)
    assert len(host_ports) == len(SCHEDULERS)
    # Every other service reaches the schedulers by the alias, whichever leads.
    for name in RUNPLANE:
        assert environment(all_services[name])["RUNPLANE_API_URL"] == "scheduler:7070", name
    assert "scheduler" not in all_services


def test_healthchecks_reach_the_port_the_service_listens_on() -> None:
    env = image_env(DOCKERFILE)
    for name, setting in HTTP_PORT_SETTING.items():
        url = healthcheck_url(services()[name]["healthcheck"]["test"])
        port = env[setting].rsplit(":", 1)[1]
        assert url.startswith(f"http://127.0.0.1:{port}/"), (name, url)
        assert url.endswith("/readyz") or name == "dashboard", (name, url)


def test_depends_on_names_services_with_known_conditions_and_no_cycle() -> None:
    all_services = services()
    for name, service in all_services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in all_services, (name, dependency)
            assert spec["condition"] in CONDITIONS, (name, spec)
    order: list[str] = []
    while len(order) < len(all_services):
        ready = [
            n
            for n, s in all_services.items()
            if n not in order and set(s.get("depends_on", {})) <= set(order)
        ]
        assert ready, f"a depends_on cycle among {set(all_services) - set(order)}"
        order.extend(sorted(ready))
    for replica in SCHEDULERS:
        scheduler = all_services[replica]["depends_on"]
        assert scheduler["migrate"]["condition"] == "service_completed_successfully"
        assert {scheduler[n]["condition"] for n in NATS} == {"service_healthy"}
        for name in ("executor-1", "executor-2", "realtime", "dashboard"):
            depends_on = all_services[name]["depends_on"]
            assert depends_on[replica]["condition"] == "service_healthy", name


def test_nats_nodes_form_one_jetstream_cluster() -> None:
    names = set()
    for node in NATS:
        args = dict(a.partition("=")[::2] for a in services()[node]["command"])
        assert "--jetstream" in args and args["--store_dir"], node
        assert args["--cluster_name"] == "runplane", node
        assert args["--routes"].split(",") == [f"nats://{n}:6222" for n in NATS], node
        names.add(args["--name"])
    assert names == set(NATS)


def test_secrets_come_from_git_ignored_env_files_made_from_the_examples() -> None:
    referenced = {f for s in services().values() for f in env_files(s)}
    assert referenced == set(ENV_FILE_EXAMPLES)
    for name, example in ENV_FILE_EXAMPLES.items():
        assert (DEPLOY / example).is_file(), example
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", str(DEPLOY / name)], cwd=ROOT, check=False
        )
        assert ignored.returncode == 0, f"deploy/{name} is not git-ignored"
    assert {"RUNPLANE_DATABASE_URL", "POSTGRES_PASSWORD"} <= env_file(DEPLOY / "example.env").keys()
    assert "RUNPLANE_WORKER_KEY" in env_file(DEPLOY / "example.executor.env")
    for name, service in services().items():
        for key in environment(service):
            assert not key.endswith(("_KEY", "PASSWORD", "DATABASE_URL")), (name, key)


def test_the_process_topology_resolves_the_alias_to_every_replica() -> None:
    """tests/helpers/compose.py: ``scheduler:7070`` as a gRPC target lists both replicas'
    loopback ports (as Compose's DNS answers with both); in a URL it names the first; each
    replica's own addresses stay its own."""
    all_services = services()
    ports = LoopbackPorts(set(all_services), network_aliases(all_services))
    assert ports.aliases == {"scheduler": list(SCHEDULERS)}
    one, two = (f"127.0.0.1:{ports.port(name, 7070)}" for name in SCHEDULERS)
    assert ports.rewrite("scheduler:7070", "realtime") == f"ipv4:{one},{two}"
    assert ports.rewrite("http://scheduler:7070/x", "realtime") == f"http://{one}/x"
    assert ports.rewrite("scheduler-2:7070", "scheduler-2") == two
    assert ports.rewrite("0.0.0.0:7070", "scheduler-2") == two
