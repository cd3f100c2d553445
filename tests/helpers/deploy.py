"""Reading ``deploy/``: the Dockerfiles' instructions, compose.yaml and its env files, and the
tools that check them offline (hadolint, Helm's Go SDK, kubernetes-validate)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.unavailable import unavailable

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
EXAMPLE_DOCKERFILE = DEPLOY / "docker" / "example" / "Dockerfile"
EXAMPLE_DIR = EXAMPLE_DOCKERFILE.parent
COMPOSE = DEPLOY / "compose.yaml"
CHART = DEPLOY / "kubernetes" / "runplane"

# The env files compose.yaml reads hold secrets and are git-ignored; each is made from the
# committed example next to it.
ENV_FILE_EXAMPLES = {"runplane.env": "example.env", "executor.env": "example.executor.env"}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (INSTRUCTION, arguments), continuations joined and
    comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (from its FROM on), in order."""
    found: list[list[tuple[str, str]]] = []
    for instruction in instructions(dockerfile):
        if instruction[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def image_env(dockerfile: Path) -> dict[str, str]:
    """The ``ENV`` of the last stage (``KEY=value`` pairs), as a container of it starts with."""
    env: dict[str, str] = {}
    for keyword, rest in stages(dockerfile)[-1]:
        if keyword == "ENV":
            for pair in rest.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def exec_form(dockerfile: Path, keyword: str) -> list[str]:
    """The JSON (exec) form of the last stage's ENTRYPOINT or CMD."""
    values = [rest for k, rest in stages(dockerfile)[-1] if k == keyword]
    assert values, f"{dockerfile.name} has no {keyword}"
    parsed = json.loads(values[-1])
    assert isinstance(parsed, list), f"{keyword} is not in exec form"
    return [str(part) for part in parsed]


def load_compose() -> dict[str, Any]:
    """compose.yaml, with its YAML anchors and merge keys resolved."""
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def env_file(path: Path) -> dict[str, str]:
    """A compose env file: ``KEY=value`` lines; ``#`` comments and blank lines skipped."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=value: {line!r}"
            env[key.strip()] = value.strip()
    return env


def env_files(service: dict[str, Any]) -> list[str]:
    files = service.get("env_file", [])
    return [files] if isinstance(files, str) else list(files)


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's ``environment`` (a mapping or a list of KEY=value) as a dict."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(str(item).partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def healthcheck_url(test: list[str]) -> str:
    """The URL a compose healthcheck's ``test`` fetches (wget's argument, or urlopen's)."""
    match = re.search(r"https?://[^\s'\"]+", " ".join(test))
    assert match, f"no URL in healthcheck {test}"
    return match.group(0)


def tool(name: str) -> str:
    """A command-line tool of the virtualenv (the dev extra installs it), else PATH's."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        unavailable(f"{name} not found: run `make setup` (the dev extra installs it)")
    return found
