"""Five-field cron expressions and when they fire in an IANA time zone. Pure: no IO, no clock
(every function takes the instant to count from).

Fields, in order: minute (0-59), hour (0-23), day-of-month (1-31), month (1-12 or JAN-DEC),
day-of-week (0-7 or SUN-SAT; 0 and 7 are Sunday). Each is ``*``, a value, a range ``a-b``, a
step ``*/n``, ``a-b/n`` or ``a/n``, or a comma list of these; ``?`` means ``*`` in the two day
fields. ``L`` in day-of-month is the month's last day; ``nL`` in day-of-week is the month's last
weekday n (``5L``: the last Friday), as in the reference (§8). No seconds field.

Days: when both day fields are restricted (neither starts with ``*`` or ``?``), a day matches if
either field matches it; otherwise both must (the rule of Vixie cron and every cron since).

Daylight-saving changes, following Python's own wall-time semantics (PEP 495):

- A wall time that a spring-forward change skips fires once, shifted forward by the length of
  the gap: a daily ``30 2 * * *`` fires at 03:30 summer time on that day (the instant an unchanged
  clock would call 02:30). Vixie cron/cronie also fire skipped jobs once, right after the change
  (03:00); either way no day loses its run. When the shifted instant is also a regular tick, it
  fires once.
- A wall time that a fall-back change repeats fires once, at its first occurrence: ``30 1 * * *``
  fires at 01:30 summer time only. A schedule whose hour field is every hour (``*``) also fires in
  the repeated hour, because it means every real hour (cronie treats such "wildcard" jobs the
  same way).
"""

from __future__ import annotations

import calendar
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

MONTH_NAMES = {name.upper(): i for i, name in enumerate(calendar.month_abbr) if name}
WEEKDAY_NAMES = {"SUN": 0, "MON": 1, "TUE": 2, "WED": 3, "THU": 4, "FRI": 5, "SAT": 6}

# Longest daylight-saving shift to look around: walls this far before ``after`` may map to
# instants after it (a skipped wall time, the second pass of a repeated hour).
_DST_MARGIN = timedelta(hours=3)
# Longest stretch with no fire time that a valid expression can have ("0 0 29 2 1" aside, which
# the OR rule makes frequent): Feb 29 recurs within 8 years.
_SEARCH_DAYS = 366 * 9


class CronError(ValueError):
    """A cron expression that cannot be parsed; ``field`` names the part at fault."""

    def __init__(self, field: str, value: str, problem: str) -> None:
        super().__init__(f"{field} {value!r}: {problem}")
        self.field = field
        self.value = value
        self.problem = problem


@dataclass(frozen=True)
class _FieldSpec:
    name: str
    low: int
    high: int
    names: dict[str, int]


_MINUTE = _FieldSpec("minute", 0, 59, {})
_HOUR = _FieldSpec("hour", 0, 23, {})
_DAY = _FieldSpec("day-of-month", 1, 31, {})
_MONTH = _FieldSpec("month", 1, 12, MONTH_NAMES)
_WEEKDAY = _FieldSpec("day-of-week", 0, 7, WEEKDAY_NAMES)


@dataclass(frozen=True)
class Cron:
    """A parsed expression. Build with :func:`parse`."""

    expression: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    last_day: bool
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    last_weekdays: frozenset[int]
    days_starred: bool
    weekdays_starred: bool

    @property
    def every_hour(self) -> bool:
        return len(self.hours) == 24

    def matches_day(self, d: date) -> bool:
        if d.month not in self.months:
            return False
        month_end = calendar.monthrange(d.year, d.month)[1]
        by_day = d.day in self.days or (self.last_day and d.day == month_end)
        weekday = d.isoweekday() % 7
        by_weekday = weekday in self.weekdays or (
            weekday in self.last_weekdays and d.day + 7 > month_end
        )
        if self.days_starred or self.weekdays_starred:
            return by_day and by_weekday
        return by_day or by_weekday


def _value(spec: _FieldSpec, text: str, item: str) -> int:
    upper = text.upper()
    if upper in spec.names:
        return spec.names[upper]
    if not (text.isascii() and text.isdigit()):
        raise CronError(spec.name, item, f"{text!r} is not a number{_names_hint(spec)}")
    value = int(text)
    if not spec.low <= value <= spec.high:
        raise CronError(spec.name, item, f"{value} is out of range {spec.low}-{spec.high}")
    return value


def _names_hint(spec: _FieldSpec) -> str:
    if not spec.names:
        return ""
    names = sorted(spec.names, key=spec.names.__getitem__)
    return f" or one of {', '.join(names)}"


def _parse_item(spec: _FieldSpec, item: str) -> set[int]:
    base, slash, step_text = item.partition("/")
    step = 1
    if slash:
        if not (step_text.isascii() and step_text.isdigit()) or int(step_text) == 0:
            raise CronError(spec.name, item, "a step must be a whole number of at least 1")
        step = int(step_text)
    if base in ("*", "?"):
        low, high = spec.low, spec.high
    elif "-" in base:
        first, _, last = base.partition("-")
        low, high = _value(spec, first, item), _value(spec, last, item)
        if low > high:
            raise CronError(spec.name, item, f"the range runs backwards ({low} > {high})")
    else:
        low = _value(spec, base, item)
        high = spec.high if slash else low
    return set(range(low, high + 1, step))


def _parse_field(spec: _FieldSpec, text: str) -> tuple[set[int], set[int]]:
    """The values of a field, and (day fields only) its ``L`` values."""
    values: set[int] = set()
    last: set[int] = set()
    for item in text.split(","):
        if not item:
            raise CronError(spec.name, text, "empty item in a list")
        upper = item.upper()
        if spec is _DAY and upper == "L":
            last.add(0)
        elif spec is _WEEKDAY and upper.endswith("L"):
            if upper == "L":
                raise CronError(
                    spec.name, item, "L needs a weekday before it, e.g. 5L for the last Friday"
                )
            last.add(_value(spec, item[:-1], item) % 7)
        else:
            values |= _parse_item(spec, item)
    return values, last


def parse(expression: str) -> Cron:
    """Parse a five-field expression; raises :class:`CronError` naming the field at fault."""
    parts = expression.split()
    if len(parts) != 5:
        raise CronError(
            "expression",
            expression,
            f"needs 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}",
        )
    minute, hour, day, month, weekday = parts
    minutes, _ = _parse_field(_MINUTE, minute)
    hours, _ = _parse_field(_HOUR, hour)
    days, last_day = _parse_field(_DAY, day)
    months, _ = _parse_field(_MONTH, month)
    weekdays, last_weekdays = _parse_field(_WEEKDAY, weekday)
    cron = Cron(
        expression=" ".join(parts),
        minutes=tuple(sorted(minutes)),
        hours=tuple(sorted(hours)),
        days=frozenset(days),
        last_day=bool(last_day),
        months=frozenset(months),
        weekdays=frozenset(w % 7 for w in weekdays),
        last_weekdays=frozenset(last_weekdays),
        days_starred=day[0] in "*?",
        weekdays_starred=weekday[0] in "*?",
    )
    if cron.weekdays_starred and not cron.last_day:
        # Only day-of-month decides: some chosen month must have some chosen day.
        longest = max(calendar.monthrange(2024, m)[1] for m in cron.months)
        if min(cron.days) > longest:
            raise CronError(_DAY.name, day, "never occurs in the chosen months")
    return cron


def _walls(cron: Cron, start: datetime) -> Iterator[datetime]:
    """Matching wall times (naive) from ``start`` on, in order."""
    day = start.date()
    for _ in range(_SEARCH_DAYS):
        if cron.matches_day(day):
            for h in cron.hours:
                for m in cron.minutes:
                    wall = datetime(day.year, day.month, day.day, h, m)
                    if wall >= start:
                        yield wall
        day += timedelta(days=1)


def _instants(cron: Cron, wall: datetime, tz: ZoneInfo) -> list[datetime]:
    """The instants (UTC) at which wall time ``wall`` fires; see the module docstring."""
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if first == second:
        return [first]
    if first.astimezone(tz).replace(tzinfo=None) != wall:
        # Skipped by a spring-forward change; fold=0 reads it with the offset before the change,
        # which lands the length of the gap later.
        return [first]
    return [first, second] if cron.every_hour else [first]


def next_after(cron: Cron, after: datetime, tz: ZoneInfo) -> datetime:
    """The first fire time strictly after ``after`` (an aware datetime), in UTC."""
    after = after.astimezone(UTC)
    local = after.astimezone(tz).replace(tzinfo=None, second=0, microsecond=0)
    best: datetime | None = None
    stop = datetime.max
    for wall in _walls(cron, local - _DST_MARGIN):
        if wall > stop:
            break
        for instant in _instants(cron, wall, tz):
            if instant > after and (best is None or instant < best):
                best, stop = instant, wall + _DST_MARGIN
    if best is None:
        raise CronError("expression", cron.expression, "never fires")
    return best


def upcoming(cron: Cron, after: datetime, tz: ZoneInfo, count: int) -> list[datetime]:
    """The next ``count`` fire times after ``after``, in UTC."""
    out: list[datetime] = []
    for _ in range(count):
        after = next_after(cron, after, tz)
        out.append(after)
    return out


def latest_between(cron: Cron, since: datetime, until: datetime, tz: ZoneInfo) -> datetime | None:
    """The last fire time in (``since``, ``until``], or None. Looks back through growing windows,
    so a schedule that was not run for months costs a few searches, not one per missed tick."""
    for window in (timedelta(hours=1), timedelta(days=1), timedelta(days=35), None):
        start = since if window is None else max(since, until - window)
        found: datetime | None = None
        tick = next_after(cron, start, tz)
        while tick <= until:
            found = tick
            tick = next_after(cron, tick, tz)
        if found is not None or start == since:
            return found
    return None
