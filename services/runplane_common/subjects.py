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


def run_events_of_environment(environment_id: str) -> str:
    """Subject of every run's events in one environment."""
    return f"{RUN_EVENTS_PREFIX}.{environment_id}.*"


RUN_STREAMS_STREAM = "RUN_STREAMS"
RUN_STREAMS_PREFIX = "runplane.streams"


def run_streams_subjects() -> list[str]:
    return [f"{RUN_STREAMS_PREFIX}.>"]


def run_stream(environment_id: str, run_id: str, stream_id: str) -> str:
    """Subject of one run's stream's chunks."""
    return f"{RUN_STREAMS_PREFIX}.{environment_id}.{run_id}.{stream_id}"
