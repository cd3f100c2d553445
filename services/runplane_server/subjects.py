"""NATS JetStream stream names and subjects: the one place they are spelled."""

from __future__ import annotations

RUN_EVENTS_STREAM = "RUN_EVENTS"
RUN_EVENTS_PREFIX = "runplane.runs"


def run_events_subjects() -> list[str]:
    return [f"{RUN_EVENTS_PREFIX}.>"]


def run_event(environment_id: str, run_id: str) -> str:
    """Subject of one run's events."""
    return f"{RUN_EVENTS_PREFIX}.{environment_id}.{run_id}"


def run_event_any_env(run_id: str) -> str:
    return f"{RUN_EVENTS_PREFIX}.*.{run_id}"
