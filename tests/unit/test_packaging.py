"""pyproject.toml's split: ``pip install runplane`` (the SDK and the task runtime) takes ranges
and none of the server extra; the CLI knows the server extra's packages by their import names;
constraints.txt pins every dependency CI installs."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from runplane_cli.main import SERVER_COMMANDS, SERVER_PACKAGES, main

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
BASE = [Requirement(r) for r in PROJECT["dependencies"]]
EXTRAS = {k: [Requirement(r) for r in v] for k, v in PROJECT["optional-dependencies"].items()}


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_the_client_install_has_none_of_the_server_extra() -> None:
    base = {canonicalize_name(r.name) for r in BASE}
    server = {canonicalize_name(r.name) for r in EXTRAS["server"]}
    assert not base & server
    for name in ("sqlalchemy", "asyncpg", "alembic", "aiosqlite", "aiohttp", "prometheus-client"):
        assert name in server and name not in base


def test_dependencies_are_ranges() -> None:
    for requirement in BASE + EXTRAS["server"]:
        operators = {spec.operator for spec in requirement.specifier}
        assert ">=" in operators and "==" not in operators, requirement


def test_the_cli_knows_the_server_extra_by_import_names() -> None:
    # Which import names each installed distribution provides (this environment has the extra).
    provides: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            provides.setdefault(canonicalize_name(dist), set()).add(module)
    wanted = {
        module
        for requirement in EXTRAS["server"]
        for module in provides[canonicalize_name(requirement.name)]
        if not module.startswith("_")
    }
    assert wanted == set(SERVER_PACKAGES)


def test_constraints_pin_every_dependency_within_its_range() -> None:
    pins = _pins()
    for requirement in BASE + [r for extra in EXTRAS.values() for r in extra]:
        version = pins.get(canonicalize_name(requirement.name))
        assert version is not None, f"constraints.txt does not pin {requirement.name}"
        assert requirement.specifier.contains(version, prereleases=True), (requirement, version)


@pytest.mark.parametrize("command", sorted(SERVER_COMMANDS))
def test_a_service_command_without_the_server_extra_says_what_to_install(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As if asyncpg were not installed (tests/install checks a real client-only install).
    find_spec = importlib.util.find_spec

    def without_asyncpg(name: str, *args: Any) -> Any:
        return None if name == "asyncpg" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_asyncpg)
    argv = {"dev": ["dev", "--tasks", "app"], "keys": ["keys", "ls"], "db": ["db", "upgrade"]}
    with pytest.raises(SystemExit) as exited:
        main(argv.get(command, [command]))
    assert exited.value.code == 2
    assert capsys.readouterr() == (
        "",
        f"runplane: `runplane {command}` needs the server extra (asyncpg is not installed): "
        'pip install "runplane[server]"\n',
    )
