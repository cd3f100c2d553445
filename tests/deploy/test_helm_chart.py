"""deploy/kubernetes/runplane: linted and rendered by Helm's own Go SDK (helm-python-sdk bundles
it as a library), and every rendered object validated against the Kubernetes JSON schemas
(kubernetes-validate bundles them), offline."""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.helpers.deploy import CHART, DEPLOY, DOCKERFILE, stages
from tests.helpers.unavailable import unavailable

# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")
REQUIRED = {
    "database": {"existingSecret": "runplane-db"},
    "keys": {"existingSecret": "runplane-keys"},
}
SECRET_SETTINGS = ("RUNPLANE_DATABASE_URL", "RUNPLANE_WORKER_KEY", "RUNPLANE_SECRET_KEY")


def _module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        unavailable(f"{name} is not installed ({error}): run `make setup`")


@pytest.fixture(scope="module")
def helm() -> ModuleType:
    return _module("helm_python")


@pytest.fixture(scope="module")
def kubernetes_validate() -> ModuleType:
    return _module("kubernetes_validate")


def render(helm: ModuleType, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's objects as `helm template` makes them (release "rp", namespace "prod")."""
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name="rp", namespace="prod", is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def containers(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objects:
        if o["kind"] in ("Deployment", "Job"):
            for c in o["spec"]["template"]["spec"]["containers"]:
                yield o["metadata"]["name"], c


def test_helm_lint_finds_nothing_above_info(helm: ModuleType) -> None:
    report = helm.lint(str(CHART), REQUIRED, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(REQUIRED, id="defaults"),
        pytest.param(
            {
                **REQUIRED,
                "tls": {"existingSecret": "runplane-tls", "requireClientCert": True},
                "executor": {"autoscaling": {"enabled": False}, "replicas": 3},
                "dashboard": {"enabled": False},
                "imagePullSecrets": [{"name": "registry"}],
            },
            id="tls-no-hpa-no-dashboard",
        ),
    ],
)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_is_valid_for_kubernetes(
    helm: ModuleType, kubernetes_validate: ModuleType, values: dict[str, Any], version: str
) -> None:
    objects = render(helm, values)
    assert len(objects) >= 9  # 3 or 4 Deployments, their Services and PDBs, the Job
    for o in objects:
        # strict: unknown fields are errors too (a misspelt key would be dropped silently).
        kubernetes_validate.validate(o, version, strict=True)


def test_the_validator_rejects_a_wrong_object(kubernetes_validate: ModuleType) -> None:
    """The check above can fail: a probe with a misspelt field is refused."""
    objects = render(_module("helm_python"), REQUIRED)
    deployment = by_kind(objects, "Deployment")["rp-runplane-scheduler"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_chart_has_every_component(helm: ModuleType) -> None:
    objects = render(helm, REQUIRED)
    deployments = by_kind(objects, "Deployment")
    assert set(deployments) == {
        f"rp-runplane-{c}" for c in ("scheduler", "executor", "realtime", "dashboard")
    }
    assert set(by_kind(objects, "Service")) == {
        f"rp-runplane-{c}" for c in ("scheduler", "realtime", "dashboard")
    }
    assert set(by_kind(objects, "PodDisruptionBudget")) == set(deployments)
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["rp-runplane-executor"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "rp-runplane-executor"
    assert "replicas" not in deployments["rp-runplane-executor"]["spec"]  # the HPA owns it
    assert not any(o["kind"] in ("StatefulSet", "Secret") for o in objects)


def test_schedulers_are_replicas_that_roll_and_advertise_their_own_pod(helm: ModuleType) -> None:
    """One leads, the others stand by: a rolling update starts a standby before it stops a
    pod (writes are fenced), and each replica is named and reached by its own pod."""
    objects = render(helm, REQUIRED)
    scheduler = by_kind(objects, "Deployment")["rp-runplane-scheduler"]["spec"]
    assert scheduler["replicas"] == 2
    assert scheduler["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    (container,) = scheduler["template"]["spec"]["containers"]
    env = {v["name"]: v for v in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    names = [v["name"] for v in container["env"]]
    # $(VAR) expands only variables defined earlier in the list.
    for setting, value in [
        ("RUNPLANE_REPLICA_ID", "$(POD_NAME)"),
        ("RUNPLANE_ADVERTISE", "$(POD_IP):7070"),
        ("RUNPLANE_SCHEDULER_HTTP_URL", "http://$(POD_IP):7074"),
    ]:
        assert env[setting]["value"] == value, setting
        used = re.search(r"\$\((\w+)\)", value)
        assert used and names.index(setting) > names.index(used.group(1)), setting
    # Clients reach whichever replica through the Service; a standby forwards.
    assert env["RUNPLANE_API_URL"]["value"] == "rp-runplane-scheduler:7070"
    # A drain keeps one replica; with one, the PDB is the others' (at most one unavailable).
    pdb = by_kind(objects, "PodDisruptionBudget")["rp-runplane-scheduler"]["spec"]
    assert pdb["minAvailable"] == 1 and "maxUnavailable" not in pdb
    one = {**REQUIRED, "scheduler": {"replicas": 1, "resources": {}}}
    pdb = by_kind(render(helm, one), "PodDisruptionBudget")["rp-runplane-scheduler"]["spec"]
    assert pdb == {**pdb, "maxUnavailable": 1} and "minAvailable" not in pdb


def test_an_operators_scheduler_http_url_is_not_overridden(helm: ModuleType) -> None:
    values = {**REQUIRED, "env": {"RUNPLANE_SCHEDULER_HTTP_URL": "https://hooks.example.com"}}
    objects = render(helm, values)
    (container,) = by_kind(objects, "Deployment")["rp-runplane-scheduler"]["spec"]["template"][
        "spec"
    ]["containers"]
    urls = [v["value"] for v in container["env"] if v["name"] == "RUNPLANE_SCHEDULER_HTTP_URL"]
    assert urls == ["https://hooks.example.com"]


def test_the_migration_job_is_a_pre_install_and_pre_upgrade_hook(helm: ModuleType) -> None:
    job = by_kind(render(helm, REQUIRED), "Job")["rp-runplane-migrate"]
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["db", "upgrade"]


def test_every_container_has_probes_resources_and_runs_as_non_root(helm: ModuleType) -> None:
    objects = render(helm, REQUIRED)
    image_user = next(rest for k, rest in stages(DOCKERFILE)[-1] if k == "USER")
    for name, c in containers(objects):
        assert {"cpu", "memory"} <= c["resources"]["requests"].keys(), name
        assert {"cpu", "memory"} <= c["resources"]["limits"].keys(), name
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
        if name.endswith("-migrate"):
            continue
        paths = {c["livenessProbe"]["httpGet"]["path"], c["readinessProbe"]["httpGet"]["path"]}
        assert paths == ({"/login"} if name.endswith("-dashboard") else {"/healthz", "/readyz"})
    for o in objects:
        if o["kind"] in ("Deployment", "Job"):
            pod = o["spec"]["template"]["spec"]["securityContext"]
            assert pod["runAsNonRoot"] is True
            assert f"{pod['runAsUser']}:{pod['runAsGroup']}" == image_user


def test_secrets_are_referenced_never_inlined(helm: ModuleType) -> None:
    objects = render(helm, REQUIRED)
    seen = set()
    for name, c in containers(objects):
        for var in c.get("env", []):
            if var["name"] in SECRET_SETTINGS:
                assert "value" not in var, (name, var)
                ref = var["valueFrom"]["secretKeyRef"]
                assert ref["name"] in ("runplane-db", "runplane-keys")
                seen.add(var["name"])
    assert seen == set(SECRET_SETTINGS)


def test_without_the_database_secret_rendering_fails_naming_it(helm: ModuleType) -> None:
    with pytest.raises(helm.HelmError, match=r"database\.existingSecret"):
        render(helm, {"keys": {"existingSecret": "runplane-keys"}})


SCHEDULER = {"resources": {}}


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"executr": {"replicas": 3}}, "additional properties 'executr' not allowed"),
        ({"scheduler": {**SCHEDULER, "replicas": 0}}, "/scheduler/replicas"),
        ({"scheduler": {**SCHEDULER, "replicas": "2"}}, "/scheduler/replicas"),
        ({"scheduler": {**SCHEDULER, "replica": 2}}, "additional properties 'replica'"),
        ({"nats": {"url": "nats-0:4222", "replicas": 3}}, "/nats/url"),
    ],
)
def test_values_schema_refuses_typos_and_no_scheduler(
    helm: ModuleType, values: dict[str, Any], error: str
) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(error)):
        render(helm, {**REQUIRED, **values})


@pytest.mark.parametrize("replicas", [1, 3])
def test_values_schema_accepts_any_number_of_scheduler_replicas(
    helm: ModuleType, kubernetes_validate: ModuleType, replicas: int
) -> None:
    objects = render(helm, {**REQUIRED, "scheduler": {**SCHEDULER, "replicas": replicas}})
    assert by_kind(objects, "Deployment")["rp-runplane-scheduler"]["spec"]["replicas"] == replicas
    for o in objects:
        kubernetes_validate.validate(o, KUBERNETES_VERSIONS[-1], strict=True)


def test_services_use_a_nats_cluster_with_three_stream_replicas(helm: ModuleType) -> None:
    objects = render(helm, REQUIRED)
    for name, c in containers(objects):
        if name.endswith("-migrate"):
            continue
        env = {v["name"]: v.get("value") for v in c["env"]}
        assert len(env["RUNPLANE_NATS_URL"].split(",")) == 3, name
        assert env["RUNPLANE_NATS_REPLICAS"] == "3", name


def test_tls_serves_https_probes_and_mounts_the_secret(helm: ModuleType) -> None:
    objects = render(helm, {**REQUIRED, "tls": {"existingSecret": "runplane-tls"}})
    for name, c in containers(objects):
        if name.endswith("-migrate"):
            continue
        assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS", name
        env = {v["name"]: v.get("value") for v in c["env"]}
        assert env["RUNPLANE_TLS_CERT"] == "/etc/runplane/tls/tls.crt", name
        assert env["RUNPLANE_REALTIME_HTTP_URL"].startswith("https://"), name
        assert {"name": "tls", "mountPath": "/etc/runplane/tls", "readOnly": True} in c[
            "volumeMounts"
        ]


def test_nats_values_enable_a_three_node_jetstream_cluster() -> None:
    """The values for the official nats/nats chart (not rendered here: it is not vendored)."""
    values = yaml.safe_load((Path(DEPLOY) / "kubernetes" / "nats-values.yaml").read_text())
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}
    assert values["config"]["jetstream"]["enabled"] is True
