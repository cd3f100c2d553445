"""deploy/docker: hadolint (the real binary, from the dev extra) passes both Dockerfiles, and the
image is what deploy/README.md says: multi-stage, the wheel with the server extra at the pinned
versions, a non-root user, ``runplane`` as the entrypoint."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.helpers.deploy import (
    DOCKERFILE,
    EXAMPLE_DIR,
    EXAMPLE_DOCKERFILE,
    ROOT,
    exec_form,
    stages,
    tool,
)


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("hadolint"), "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, EXAMPLE_DOCKERFILE], ids=["image", "example"])
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    result = hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    """The check above can fail: an unpinned base image and apt-get without pins are found."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install curl\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3008" in result.stdout


def test_the_image_is_built_in_two_stages_and_runs_as_non_root() -> None:
    builder, runtime = stages(DOCKERFILE)
    assert re.fullmatch(r"python:3\.11-slim\S* AS builder", builder[0][1])
    assert re.fullmatch(r"python:3\.11-slim\S* AS runtime", runtime[0][1])
    assert any(k == "RUN" and "pip wheel" in rest for k, rest in builder)
    (install,) = [rest for k, rest in runtime if k == "RUN" and "pip install" in rest]
    assert "--constraint" in install and "constraints.txt" in install
    assert re.search(r"runplane-\*\.whl\)\[server\]", install), install
    (user,) = [rest for k, rest in runtime if k == "USER"]
    assert int(user.split(":")[0]) >= 1000
    assert exec_form(DOCKERFILE, "ENTRYPOINT") == ["runplane"]


def test_the_entrypoint_is_the_packages_runplane_command() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["runplane"] == "runplane_cli.main:main"
    assert "server" in project["optional-dependencies"]


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    """.dockerignore keeps everything out but the paths the builder copies."""
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = set()
    for k, rest in stages(DOCKERFILE)[0]:
        if k == "COPY":
            copied.update(part.rstrip("/") for part in rest.split()[:-1])
    assert copied and copied <= allowed, copied - allowed
    assert all((ROOT / path).exists() for path in copied)


def test_the_example_task_image_builds_from_the_runplane_image() -> None:
    keywords = [k for stage in stages(EXAMPLE_DOCKERFILE) for k, _ in stage]
    assert keywords.count("FROM") == 1
    assert exec_form(EXAMPLE_DOCKERFILE, "CMD")[:3] == ["executor", "--tasks", "acme_tasks"]
    assert (EXAMPLE_DIR / "acme_tasks.py").exists()
