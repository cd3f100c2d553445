"""Durations as people write them: seconds (int/float), ``timedelta``, or ``"90s"``, ``"10m"``,
``"1h30m"``, ``"2d"``, ``"1w"``. The SDK (options such as ``delay="10m"``) and the command line
(``runplane keys rotate --grace 1h``) read them alike."""

from __future__ import annotations

import re
from datetime import timedelta

DurationLike = int | float | timedelta | str

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


class DurationError(ValueError):
    """A value that is not a duration; the message names the setting it was given for."""


def seconds(value: DurationLike, name: str = "duration") -> float:
    """``value`` in seconds; DurationError naming ``name`` when it is not a duration."""
    if isinstance(value, bool):
        raise DurationError(f"{name}: {value!r} is not a duration")
    if isinstance(value, int | float):
        total = float(value)
    elif isinstance(value, timedelta):
        total = value.total_seconds()
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        parts = _PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise DurationError(
                f'{name}: {value!r} is not a duration (e.g. 30, "90s", "10m", "1h30m", "2d")'
            )
        total = sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise DurationError(f"{name}: {value!r} is not a duration")
    if total < 0:
        raise DurationError(f"{name}: must not be negative, got {value!r}")
    return total
