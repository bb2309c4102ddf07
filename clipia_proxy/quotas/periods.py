"""Calendar windows of budgets in ``accounting.timezone`` (pure).

A request belongs to the windows that contain its *admission* time; its settlement is charged
to those same windows even when it ends after midnight. Days follow the zone's wall clock, so a
DST day is 23 or 25 hours long; weeks are ISO weeks (Monday to Sunday, week 53 included);
``total`` never resets. No reset job exists: the window key is computed from the time.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import msgspec

from .model import Period

__all__ = ["Window", "window", "windows"]


class Window(msgspec.Struct, frozen=True, kw_only=True):
    """One period's window: its key and when it resets (``None`` for ``total``)."""

    period: Period
    key: str
    resets_at: dt.datetime | None


def _midnight(day: dt.date, zone: ZoneInfo) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(0), tzinfo=zone)


def window(period: Period, now: dt.datetime, zone: ZoneInfo) -> Window:
    """Return the window of ``period`` that contains ``now`` (an aware datetime)."""
    local = now.astimezone(zone)
    today = local.date()
    match period:
        case Period.DAY:
            return Window(
                period=period,
                key=f"day:{today.isoformat()}",
                resets_at=_midnight(today + dt.timedelta(days=1), zone),
            )
        case Period.WEEK:
            year, week, weekday = today.isocalendar()
            monday = today - dt.timedelta(days=weekday - 1)
            return Window(
                period=period,
                key=f"week:{year}-W{week:02d}",
                resets_at=_midnight(monday + dt.timedelta(days=7), zone),
            )
        case Period.MONTH:
            first_next = (today.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
            return Window(
                period=period, key=f"month:{today:%Y-%m}", resets_at=_midnight(first_next, zone)
            )
        case Period.TOTAL:
            return Window(period=period, key="total", resets_at=None)
        case Period.KEY_DAY | Period.KEY_WEEK | Period.KEY_MONTH | Period.KEY_TOTAL:
            # A key's own budget follows its team period's window (the key suffix is added
            # by the caller, who knows the key).
            return window(period.calendar, now, zone)


def windows(periods: list[Period], now: dt.datetime, zone: ZoneInfo) -> dict[Period, Window]:
    """Return the window of every period in ``periods`` at ``now``."""
    return {period: window(period, now, zone) for period in periods}
