"""Cron parsing and fire times, including daylight-saving changes in three time zones. Pure: the
instant to count from is passed in (the injected clock)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from runplane_core.cron import CronError, latest_between, next_after, parse, upcoming

LONDON = ZoneInfo("Europe/London")
NEW_YORK = ZoneInfo("America/New_York")
SYDNEY = ZoneInfo("Australia/Sydney")


def _local(times: list[datetime], tz: ZoneInfo) -> list[str]:
    return [t.astimezone(tz).isoformat() for t in times]


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


# -- spring forward: a 02:30 daily schedule fires once, at 03:30 summer time --------------------


@pytest.mark.parametrize(
    ("tz", "cron", "day_before", "expected"),
    [
        # London: 2026-03-29 01:00 GMT -> 02:00 BST (01:00-01:59 skipped).
        (
            LONDON,
            "30 1 * * *",
            _utc(2026, 3, 28, 12),
            ["2026-03-29T02:30:00+01:00", "2026-03-30T01:30:00+01:00"],
        ),
        # New York: 2026-03-08 02:00 EST -> 03:00 EDT.
        (
            NEW_YORK,
            "30 2 * * *",
            _utc(2026, 3, 7, 12),
            ["2026-03-08T03:30:00-04:00", "2026-03-09T02:30:00-04:00"],
        ),
        # Sydney: 2026-10-04 02:00 AEST -> 03:00 AEDT.
        (
            SYDNEY,
            "30 2 * * *",
            _utc(2026, 10, 3, 0),
            ["2026-10-04T03:30:00+11:00", "2026-10-05T02:30:00+11:00"],
        ),
    ],
)
def test_a_daily_time_skipped_by_spring_forward_fires_once_shifted_by_the_gap(
    tz: ZoneInfo, cron: str, day_before: datetime, expected: list[str]
) -> None:
    assert _local(upcoming(parse(cron), day_before, tz, 2), tz) == expected


# -- fall back: a 01:30 daily schedule fires once, at the first 01:30 ----------------------------


@pytest.mark.parametrize(
    ("tz", "cron", "day_before", "expected"),
    [
        # London: 2026-10-25 02:00 BST -> 01:00 GMT (01:00-01:59 twice).
        (
            LONDON,
            "30 1 * * *",
            _utc(2026, 10, 24, 12),
            ["2026-10-25T01:30:00+01:00", "2026-10-26T01:30:00+00:00"],
        ),
        # New York: 2026-11-01 02:00 EDT -> 01:00 EST.
        (
            NEW_YORK,
            "30 1 * * *",
            _utc(2026, 10, 31, 12),
            ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"],
        ),
        # Sydney: 2026-04-05 03:00 AEDT -> 02:00 AEST (02:00-02:59 twice).
        (
            SYDNEY,
            "30 2 * * *",
            _utc(2026, 4, 4, 0),
            ["2026-04-05T02:30:00+11:00", "2026-04-06T02:30:00+10:00"],
        ),
    ],
)
def test_a_daily_time_repeated_by_fall_back_fires_once(
    tz: ZoneInfo, cron: str, day_before: datetime, expected: list[str]
) -> None:
    assert _local(upcoming(parse(cron), day_before, tz, 2), tz) == expected


def test_an_hourly_schedule_fires_every_real_hour_across_both_changes() -> None:
    hourly = parse("0 * * * *")
    # Fall back in New York: the 01:00 hour happens twice, and both are real hours.
    assert _local(upcoming(hourly, _utc(2026, 11, 1, 4, 30), NEW_YORK, 4), NEW_YORK) == [
        "2026-11-01T01:00:00-04:00",
        "2026-11-01T01:00:00-05:00",
        "2026-11-01T02:00:00-05:00",
        "2026-11-01T03:00:00-05:00",
    ]
    # Spring forward in London: 01:00 does not exist; the shifted 01:00 is the real 02:00.
    assert _local(upcoming(hourly, _utc(2026, 3, 28, 23, 30), LONDON, 3), LONDON) == [
        "2026-03-29T00:00:00+00:00",
        "2026-03-29T02:00:00+01:00",
        "2026-03-29T03:00:00+01:00",
    ]


def test_every_15_minutes_inside_a_skipped_hour_keeps_its_spacing_and_fires_each_once() -> None:
    ticks = upcoming(parse("*/15 2 * * *"), _utc(2026, 3, 8, 6), NEW_YORK, 5)
    assert _local(ticks, NEW_YORK) == [
        "2026-03-08T03:00:00-04:00",
        "2026-03-08T03:15:00-04:00",
        "2026-03-08T03:30:00-04:00",
        "2026-03-08T03:45:00-04:00",
        "2026-03-09T02:00:00-04:00",
    ]
    # A regular 03:30 tick that coincides with the shifted 02:30 fires once.
    both = upcoming(parse("30 2,3 * * *"), _utc(2026, 3, 8, 6), NEW_YORK, 2)
    assert _local(both, NEW_YORK) == ["2026-03-08T03:30:00-04:00", "2026-03-09T02:30:00-04:00"]


def test_weekdays_at_nine_in_london_across_the_change() -> None:
    ticks = upcoming(parse("0 9 * * 1-5"), _utc(2026, 3, 26, 12), LONDON, 3)
    assert _local(ticks, LONDON) == [
        "2026-03-27T09:00:00+00:00",  # Friday, GMT
        "2026-03-30T09:00:00+01:00",  # Monday, BST: 08:00 UTC
        "2026-03-31T09:00:00+01:00",
    ]
    assert ticks[1] == _utc(2026, 3, 30, 8)


# -- syntax ---------------------------------------------------------------------------------------


def test_last_day_of_month_and_last_weekday() -> None:
    utc = ZoneInfo("UTC")
    assert _local(upcoming(parse("0 0 L * *"), _utc(2028, 1, 15), utc, 3), utc) == [
        "2028-01-31T00:00:00+00:00",
        "2028-02-29T00:00:00+00:00",
        "2028-03-31T00:00:00+00:00",
    ]
    # 5L: the month's last Friday.
    assert _local(upcoming(parse("0 12 * * 5L"), _utc(2026, 1, 1), utc, 2), utc) == [
        "2026-01-30T12:00:00+00:00",
        "2026-02-27T12:00:00+00:00",
    ]
    # 7L and 0L are both the last Sunday.
    assert parse("0 0 * * 7L").last_weekdays == parse("0 0 * * 0L").last_weekdays == {0}


def test_names_lists_ranges_and_steps() -> None:
    cron = parse("0,30 8-18/2 * jan,JUL MON-FRI")
    assert cron.minutes == (0, 30)
    assert cron.hours == (8, 10, 12, 14, 16, 18)
    assert cron.months == {1, 7}
    assert cron.weekdays == {1, 2, 3, 4, 5}
    assert parse("5/20 * * * *").minutes == (5, 25, 45)
    assert parse("0 0 * * 7").weekdays == {0}  # 7 is Sunday too
    assert parse("0 0 * * 5-7").weekdays == {5, 6, 0}


def test_day_of_month_or_day_of_week_when_both_are_restricted() -> None:
    # The 1st and every Monday (standard cron OR rule).
    ticks = upcoming(parse("0 0 1 * 1"), _utc(2026, 5, 29), ZoneInfo("UTC"), 3)
    assert [t.date().isoformat() for t in ticks] == ["2026-06-01", "2026-06-08", "2026-06-15"]
    # With a starred day-of-month both must match: Mondays that are odd days.
    odd_mondays = upcoming(parse("0 0 */2 * 1"), _utc(2026, 6, 1), ZoneInfo("UTC"), 2)
    assert [t.date().isoformat() for t in odd_mondays] == ["2026-06-15", "2026-06-29"]


def test_next_after_is_strictly_after() -> None:
    minutely = parse("* * * * *")
    assert next_after(minutely, _utc(2026, 1, 1, 0, 0), SYDNEY) == _utc(2026, 1, 1, 0, 1)
    assert next_after(minutely, _utc(2026, 1, 1, 0, 0, 59), LONDON) == _utc(2026, 1, 1, 0, 1)


def test_latest_between_finds_the_last_missed_tick_only() -> None:
    minutely = parse("* * * * *")
    utc = ZoneInfo("UTC")
    since, until = _utc(2026, 1, 1), _utc(2026, 3, 5, 3, 4, 5)
    assert latest_between(minutely, since, until, utc) == _utc(2026, 3, 5, 3, 4)
    yearly = parse("0 0 1 1 *")
    assert latest_between(yearly, _utc(2026, 1, 1), _utc(2026, 12, 31), utc) is None
    assert latest_between(yearly, _utc(2025, 6, 1), _utc(2026, 12, 31), utc) == _utc(2026, 1, 1)


@pytest.mark.parametrize(
    ("expression", "field", "value"),
    [
        ("* * * *", "expression", "* * * *"),
        ("60 * * * *", "minute", "60"),
        ("* 24 * * *", "hour", "24"),
        ("* * 0 * *", "day-of-month", "0"),
        ("* * * 13 *", "month", "13"),
        ("* * * JUX *", "month", "JUX"),
        ("* * * * 8", "day-of-week", "8"),
        ("* * * * FUNDAY", "day-of-week", "FUNDAY"),
        ("*/0 * * * *", "minute", "*/0"),
        ("10-5 * * * *", "minute", "10-5"),
        ("1,,2 * * * *", "minute", "1,,2"),
        ("\u00b2 * * * *", "minute", "\u00b2"),
        ("*/\u0663 * * * *", "minute", "*/\u0663"),
        ("* * * * L", "day-of-week", "L"),
        ("* * 5L * *", "day-of-month", "5L"),
        ("0 0 30 2 *", "day-of-month", "30"),
    ],
)
def test_parse_errors_name_the_field_and_the_bad_value(
    expression: str, field: str, value: str
) -> None:
    with pytest.raises(CronError) as caught:
        parse(expression)
    assert caught.value.field == field
    assert caught.value.value == value
    assert field in str(caught.value) and repr(value) in str(caught.value)
