"""Service settings read from the environment (``runplane_common.config``)."""

from __future__ import annotations

import dataclasses

import pytest

from runplane_common.config import Limits, RealtimeSettings, SchedulerSettings, TelemetrySettings


def test_every_limit_is_read_from_its_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = [f.name for f in dataclasses.fields(Limits)]
    for offset, name in enumerate(names):
        monkeypatch.setenv(f"RUNPLANE_LIMIT_{name.upper()}", str(7000 + offset))
    limits = Limits.from_env()
    assert {name: getattr(limits, name) for name in names} == {
        name: 7000 + offset for offset, name in enumerate(names)
    }
    assert SchedulerSettings.from_env().limits == limits
    assert RealtimeSettings.from_env().limits == limits


def test_limits_not_in_the_environment_keep_their_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for field in dataclasses.fields(Limits):
        monkeypatch.delenv(f"RUNPLANE_LIMIT_{field.name.upper()}", raising=False)
    assert Limits.from_env() == Limits()


def test_telemetry_settings_come_from_the_standard_otel_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OTEL_SERVICE_NAME", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert TelemetrySettings.from_env("runplane-realtime") == TelemetrySettings("runplane-realtime")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-realtime")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert TelemetrySettings.from_env("runplane-realtime") == TelemetrySettings(
        "edge-realtime", traces_exporter="console", otlp_endpoint="http://127.0.0.1:4317"
    )


def test_the_scheduler_token_endpoint_is_configured_in_its_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RUNPLANE_SCHEDULER_HTTP_LISTEN", "127.0.0.1:7073")
    monkeypatch.setenv("RUNPLANE_SCHEDULER_HTTP_URL", "https://tokens.example")
    settings = SchedulerSettings.from_env()
    assert (settings.http_listen, settings.http_url) == ("127.0.0.1:7073", "https://tokens.example")


def test_version_promotion_is_auto_or_manual(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNPLANE_VERSION_PROMOTION", "manual")
    assert SchedulerSettings.from_env().version_promotion == "manual"
    monkeypatch.delenv("RUNPLANE_VERSION_PROMOTION")
    assert SchedulerSettings.from_env().version_promotion == "auto"
    with pytest.raises(ValueError, match="RUNPLANE_VERSION_PROMOTION must be 'auto' or 'manual'"):
        SchedulerSettings(version_promotion="sometimes")


@pytest.mark.parametrize("settings", [SchedulerSettings, RealtimeSettings])
def test_the_nats_url_names_one_server_or_a_cluster(
    monkeypatch: pytest.MonkeyPatch, settings: type[SchedulerSettings | RealtimeSettings]
) -> None:
    monkeypatch.delenv("RUNPLANE_NATS_URL", raising=False)
    assert settings.from_env().nats_servers == ("nats://127.0.0.1:4222",)
    monkeypatch.setenv("RUNPLANE_NATS_URL", "nats://10.0.0.1:4222")
    assert settings.from_env().nats_servers == ("nats://10.0.0.1:4222",)
    monkeypatch.setenv("RUNPLANE_NATS_URL", "nats://n1:4222, nats://n2:4222,tls://n3:4222")
    parsed = settings.from_env()
    assert parsed.nats_servers == ("nats://n1:4222", "nats://n2:4222", "tls://n3:4222")
    assert parsed.nats_url == "nats://n1:4222, nats://n2:4222,tls://n3:4222"
    monkeypatch.setenv("RUNPLANE_NATS_URL", "n1:4222,n2")  # nats:// and the default port
    assert settings.from_env().nats_servers == ("n1:4222", "n2")


@pytest.mark.parametrize(
    "value",
    [
        "nats://n1:4222,",  # an empty member
        "nats://n1:4222,,nats://n2:4222",
        "http://n1:4222",
        "nats://n1:port",
        "nats://n1:70000",
        "nats://:4222",
        " , ",
    ],
)
def test_a_bad_nats_url_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("RUNPLANE_NATS_URL", value)
    for settings in (SchedulerSettings, RealtimeSettings):
        with pytest.raises(ValueError, match="RUNPLANE_NATS_URL must be a NATS server URL"):
            settings.from_env()


def test_a_refused_nats_url_does_not_repeat_its_password() -> None:
    with pytest.raises(ValueError, match="RUNPLANE_NATS_URL") as refused:
        SchedulerSettings(nats_url="nats://app:s3cret@n1:4222,ftp://app:s3cret@n2")
    assert "s3cret" not in str(refused.value)
    assert "ftp://n2" in str(refused.value)


@pytest.mark.parametrize("settings", [SchedulerSettings, RealtimeSettings])
def test_nats_replicas_default_to_one_and_are_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, settings: type[SchedulerSettings | RealtimeSettings]
) -> None:
    monkeypatch.delenv("RUNPLANE_NATS_REPLICAS", raising=False)
    assert settings.from_env().nats_replicas == 1
    for replicas in ("1", "3", "5"):
        monkeypatch.setenv("RUNPLANE_NATS_REPLICAS", replicas)
        assert settings.from_env().nats_replicas == int(replicas)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0", "must be 1 to 5"),
        ("6", "must be 1 to 5"),
        ("-1", "must be 1 to 5"),
        ("three", "must be a whole number from 1 to 5, not 'three'"),
        ("2.5", "must be a whole number"),
    ],
)
def test_bad_nats_replicas_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    monkeypatch.setenv("RUNPLANE_NATS_REPLICAS", value)
    for settings in (SchedulerSettings, RealtimeSettings):
        with pytest.raises(ValueError, match=f"RUNPLANE_NATS_REPLICAS {problem}"):
            settings.from_env()
    with pytest.raises(ValueError, match="RUNPLANE_NATS_REPLICAS must be 1 to 5"):
        RealtimeSettings(nats_replicas=0)
