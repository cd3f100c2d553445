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
