"""Durations as users write them: seconds (int/float), ``timedelta``, or ``"90s"``, ``"10m"``,
``"1h30m"``, ``"2d"``, ``"1w"``. Pure functions over :mod:`runplane_core.durations`, raising
the SDK's ConfigurationError."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from runplane._errors import ConfigurationError
from runplane_core.durations import DurationError, DurationLike

__all__ = ["DurationLike", "seconds", "timestamp_pb", "to_pb"]
from runplane_core.durations import seconds as core_seconds


def seconds(value: DurationLike, name: str = "duration") -> float:
    """``value`` in seconds; ConfigurationError naming ``name`` when it is not a duration."""
    try:
        return core_seconds(value, name)
    except DurationError as e:
        raise ConfigurationError(str(e)) from None


def to_pb(value: DurationLike, name: str = "duration") -> Duration:
    d = Duration()
    d.FromMilliseconds(round(seconds(value, name) * 1000))
    return d


def timestamp_pb(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return ts
