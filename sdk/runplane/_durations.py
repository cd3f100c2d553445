"""Durations as users write them: seconds (int/float), ``timedelta``, or ``"90s"``, ``"10m"``,
``"1h30m"``, ``"2d"``, ``"1w"``. Pure functions."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from runplane._errors import ConfigurationError

DurationLike = int | float | timedelta | str

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def seconds(value: DurationLike, name: str = "duration") -> float:
    """``value`` in seconds; ConfigurationError naming ``name`` when it is not a duration."""
    if isinstance(value, bool):
        raise ConfigurationError(f"{name}: {value!r} is not a duration")
    if isinstance(value, int | float):
        total = float(value)
    elif isinstance(value, timedelta):
        total = value.total_seconds()
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        parts = _PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ConfigurationError(
                f'{name}: {value!r} is not a duration (e.g. 30, "90s", "10m", "1h30m", "2d")'
            )
        total = sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise ConfigurationError(f"{name}: {value!r} is not a duration")
    if total < 0:
        raise ConfigurationError(f"{name}: must not be negative, got {value!r}")
    return total


def to_pb(value: DurationLike, name: str = "duration") -> Duration:
    d = Duration()
    d.FromMilliseconds(round(seconds(value, name) * 1000))
    return d


def timestamp_pb(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return ts
