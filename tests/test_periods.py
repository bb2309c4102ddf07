"""Calendar windows of budgets: keys and resets in the accounting zone (pure, injected times)."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from clipia_proxy.quotas.model import Period
from clipia_proxy.quotas.periods import window, windows

TEAM_PERIODS = [Period.DAY, Period.WEEK, Period.MONTH, Period.TOTAL]
"""The calendar periods (a key's own budget periods follow them)."""
MSK = ZoneInfo("Europe/Moscow")
NY = ZoneInfo("America/New_York")
UTC = dt.UTC


def at(zone: dt.tzinfo, *parts: int, micro: int = 0) -> dt.datetime:
    return dt.datetime(*parts, microsecond=micro, tzinfo=zone)  # type: ignore[arg-type, misc]


def keys(now: dt.datetime, zone: ZoneInfo) -> dict[Period, str]:
    return {p: w.key for p, w in windows(TEAM_PERIODS, now, zone).items()}


def test_moscow_keys_and_resets() -> None:
    now = at(MSK, 2026, 11, 25, 14, 30)
    found = windows(TEAM_PERIODS, now, MSK)
    assert {p: w.key for p, w in found.items()} == {
        Period.DAY: "day:2026-11-25",
        Period.WEEK: "week:2026-W48",
        Period.MONTH: "month:2026-11",
        Period.TOTAL: "total",
    }
    assert found[Period.DAY].resets_at == at(MSK, 2026, 11, 26, 0, 0)
    assert found[Period.WEEK].resets_at == at(MSK, 2026, 11, 30, 0, 0)  # next Monday
    assert found[Period.MONTH].resets_at == at(MSK, 2026, 12, 1, 0, 0)
    assert found[Period.TOTAL].resets_at is None
    # Moscow is UTC+3 all year: midnight local is 21:00 UTC the day before.
    resets = found[Period.DAY].resets_at
    assert resets is not None
    assert resets.astimezone(UTC) == at(UTC, 2026, 11, 25, 21, 0)


def test_the_zone_decides_the_day_not_utc() -> None:
    # 22:30 UTC on the 25th is already the 26th in Moscow.
    now = at(UTC, 2026, 11, 25, 22, 30)
    assert window(Period.DAY, now, MSK).key == "day:2026-11-26"
    assert window(Period.DAY, now, ZoneInfo("UTC")).key == "day:2026-11-25"
    assert window(Period.DAY, now, NY).key == "day:2026-11-25"


def test_admitted_a_tenth_of_a_second_before_midnight_is_that_day() -> None:
    now = at(MSK, 2026, 11, 25, 23, 59, 59, micro=900_000)
    day = window(Period.DAY, now, MSK)
    assert day.key == "day:2026-11-25"
    assert day.resets_at is not None
    assert (day.resets_at - now).total_seconds() == pytest.approx(0.1)
    # From an epoch float, as the service computes it.
    from_epoch = dt.datetime.fromtimestamp(now.timestamp(), UTC)
    assert window(Period.DAY, from_epoch, MSK).key == "day:2026-11-25"
    assert window(Period.DAY, at(MSK, 2026, 11, 26, 0, 0), MSK).key == "day:2026-11-26"


@pytest.mark.parametrize(
    ("day", "hours", "key"),
    [
        (dt.date(2026, 3, 8), 23, "day:2026-03-08"),  # spring forward
        (dt.date(2026, 11, 1), 25, "day:2026-11-01"),  # fall back
        (dt.date(2026, 6, 15), 24, "day:2026-06-15"),
    ],
)
def test_dst_days_are_23_or_25_hours(day: dt.date, hours: int, key: str) -> None:
    start = at(NY, day.year, day.month, day.day, 0, 0)
    found = window(Period.DAY, start, NY)
    assert found.key == key
    assert found.resets_at is not None
    length = found.resets_at.astimezone(UTC) - start.astimezone(UTC)
    assert length == dt.timedelta(hours=hours)
    # The last instant of the day (in absolute time) is still that day.
    last = (found.resets_at.astimezone(UTC) - dt.timedelta(microseconds=1)).astimezone(NY)
    assert window(Period.DAY, last, NY).key == key


def test_fall_back_repeated_hour_is_one_day() -> None:
    first = dt.datetime(2026, 11, 1, 1, 30, tzinfo=NY, fold=0)  # EDT
    second = dt.datetime(2026, 11, 1, 1, 30, tzinfo=NY, fold=1)  # EST, an hour later
    assert (second.astimezone(UTC) - first.astimezone(UTC)) == dt.timedelta(hours=1)
    assert window(Period.DAY, first, NY) == window(Period.DAY, second, NY)


def test_week_reset_across_dst_is_a_local_midnight() -> None:
    # The week of 2026-11-01 (Sunday, fall back) ends Monday 2026-11-02 00:00 EST.
    found = window(Period.WEEK, at(NY, 2026, 10, 28, 12, 0), NY)
    assert found.key == "week:2026-W44"
    assert found.resets_at is not None
    assert found.resets_at.astimezone(UTC) == at(UTC, 2026, 11, 2, 5, 0)
    length = found.resets_at.astimezone(UTC) - at(NY, 2026, 10, 26, 0, 0).astimezone(UTC)
    assert length.total_seconds() == 7 * 86400 + 3600


@pytest.mark.parametrize(
    ("local", "month", "resets"),
    [
        ((2026, 1, 31, 23, 59), "month:2026-01", (2026, 2, 1)),
        ((2026, 2, 28, 12, 0), "month:2026-02", (2026, 3, 1)),
        ((2028, 2, 29, 23, 59), "month:2028-02", (2028, 3, 1)),
        ((2026, 4, 30, 0, 0), "month:2026-04", (2026, 5, 1)),
        ((2026, 12, 31, 23, 59), "month:2026-12", (2027, 1, 1)),
        ((2027, 1, 1, 0, 0), "month:2027-01", (2027, 2, 1)),
    ],
)
def test_month_ends(local: tuple[int, ...], month: str, resets: tuple[int, int, int]) -> None:
    found = window(Period.MONTH, at(MSK, *local), MSK)
    assert found.key == month
    assert found.resets_at == at(MSK, *resets, 0, 0)


def test_29_february() -> None:
    now = at(MSK, 2028, 2, 29, 23, 59, 59, micro=999_999)
    assert keys(now, MSK) == {
        Period.DAY: "day:2028-02-29",
        Period.WEEK: "week:2028-W09",
        Period.MONTH: "month:2028-02",
        Period.TOTAL: "total",
    }
    day = window(Period.DAY, now, MSK)
    assert day.resets_at == at(MSK, 2028, 3, 1, 0, 0)


@pytest.mark.parametrize(
    ("date", "week", "monday_after"),
    [
        ((2026, 12, 31), "week:2026-W53", (2027, 1, 4)),  # Thursday of a 53-week year
        ((2027, 1, 3), "week:2026-W53", (2027, 1, 4)),  # Sunday: still 2026's week 53
        ((2027, 1, 4), "week:2027-W01", (2027, 1, 11)),
        ((2024, 12, 30), "week:2025-W01", (2025, 1, 6)),  # Monday of next ISO year's week 1
        ((2021, 1, 3), "week:2020-W53", (2021, 1, 4)),
        ((2026, 11, 30), "week:2026-W49", (2026, 12, 7)),
    ],
)
def test_iso_weeks(
    date: tuple[int, int, int], week: str, monday_after: tuple[int, int, int]
) -> None:
    found = window(Period.WEEK, at(MSK, *date, 12, 0), MSK)
    assert found.key == week
    assert found.resets_at == at(MSK, *monday_after, 0, 0)


def test_year_end() -> None:
    last = at(MSK, 2026, 12, 31, 23, 59, 59, micro=900_000)
    first = at(MSK, 2027, 1, 1, 0, 0)
    assert keys(last, MSK) == {
        Period.DAY: "day:2026-12-31",
        Period.WEEK: "week:2026-W53",
        Period.MONTH: "month:2026-12",
        Period.TOTAL: "total",
    }
    assert keys(first, MSK) == {
        Period.DAY: "day:2027-01-01",
        Period.WEEK: "week:2026-W53",
        Period.MONTH: "month:2027-01",
        Period.TOTAL: "total",
    }
    for period in (Period.DAY, Period.MONTH):
        assert window(period, last, MSK).resets_at == first


def test_every_day_of_two_years_has_consistent_windows() -> None:
    """Each day's reset is the next day's start; keys change exactly at local midnight."""
    day = dt.date(2026, 1, 1)
    while day < dt.date(2028, 1, 1):
        for zone in (MSK, NY):
            start = at(zone, day.year, day.month, day.day, 0, 0)
            found = windows(TEAM_PERIODS, start, zone)
            nxt = day + dt.timedelta(days=1)
            assert found[Period.DAY].key == f"day:{day.isoformat()}"
            assert found[Period.DAY].resets_at == at(zone, nxt.year, nxt.month, nxt.day, 0, 0)
            before = (start.astimezone(UTC) - dt.timedelta(microseconds=1)).astimezone(zone)
            assert window(Period.DAY, before, zone).key != found[Period.DAY].key
            month_reset = found[Period.MONTH].resets_at
            assert month_reset is not None
            assert month_reset.day == 1
            assert month_reset.hour == 0
            week_reset = found[Period.WEEK].resets_at
            assert week_reset is not None
            assert week_reset.isoweekday() == 1
            assert 0 < (week_reset.date() - day).days <= 7
        day += dt.timedelta(days=1)
