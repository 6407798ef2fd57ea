"""Reclone schedules: fire instants across months and daylight-saving changes, the missed-run
policy, no overlap, the scheduler on an injected clock, the store adapter, the API and CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from itertools import pairwise, takewhile
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import tomlkit
from aiohttp import web
from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from stead.api.server import _authenticate
from stead.cli import schedule as cli
from stead.errors import AgentUnavailable, UsageError
from stead.reclone.schedule import (
    ON_TIME,
    Schedule,
    due,
    iter_runs,
    next_runs,
    parse_schedule,
    to_utc,
)
from stead.reclone.schedule_api import add_routes
from stead.reclone.scheduler import (
    MemorySchedules,
    RunRecord,
    Scheduler,
    StoreBackedSchedules,
)
from stead.store.db import StateStore

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
CREATED = datetime(2026, 1, 1, tzinfo=UTC)
SECOND_TUESDAY_DAY_AFTER = "FREQ=MONTHLY;BYDAY=+2TU;BYHOUR=3;BYMINUTE=0"


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def make(**fields: Any) -> Schedule:
    data: dict[str, Any] = {"name": "nightly", "nodes": ["secondary"], "created": CREATED}
    return parse_schedule(data | fields)


# --- fire instants ----------------------------------------------------------------------------


def test_cron_next_runs_are_utc_instants_of_local_wall_clock() -> None:
    schedule = make(cron="0 3 * * 0", timezone="UTC")
    assert next_runs(schedule, utc(2026, 1, 1), 3) == [
        utc(2026, 1, 4, 3),
        utc(2026, 1, 11, 3),
        utc(2026, 1, 18, 3),
    ]
    assert next_runs(schedule, utc(2026, 1, 4, 3), 1) == [utc(2026, 1, 11, 3)]  # strictly after


def test_the_day_after_the_second_tuesday_at_0300_in_berlin_through_2026() -> None:
    schedule = make(rrule=SECOND_TUESDAY_DAY_AFTER, offset_days=1, timezone="Europe/Berlin")
    runs = next_runs(schedule, utc(2026, 1, 1), 12)
    # Second Tuesdays of 2026: 13 Jan, 10 Feb, 10 Mar, 14 Apr, 12 May, 9 Jun, 14 Jul, 11 Aug,
    # 8 Sep, 13 Oct, 10 Nov, 8 Dec; always 03:00 in Berlin, CET or CEST.
    days = [(1, 14), (2, 11), (3, 11), (4, 15), (5, 13), (6, 10)]
    days += [(7, 15), (8, 12), (9, 9), (10, 14), (11, 11), (12, 9)]
    assert [r.astimezone(BERLIN).replace(tzinfo=None) for r in runs] == [
        datetime(2026, month, day, 3) for month, day in days
    ]
    summer = {4, 5, 6, 7, 8, 9, 10}
    assert [r.hour for r in runs] == [1 if month in summer else 2 for month, _ in days]
    # and it goes on into the next year
    assert next_runs(schedule, runs[-1], 1) == [utc(2027, 1, 13, 2)]  # 12 Jan 2027 is Tuesday


def test_a_day_offset_carries_a_month_end_occurrence_into_the_next_month() -> None:
    # A second Tuesday falls on the 8th to 14th, so its day after never leaves the month; the
    # last Tuesday does: 31 March 2026 and 30 June 2026 are Tuesdays.
    schedule = make(
        rrule="FREQ=MONTHLY;BYDAY=-1TU;BYHOUR=3;BYMINUTE=0",
        offset_days=1,
        timezone="Europe/Berlin",
    )
    runs = next_runs(schedule, utc(2026, 3, 1), 5)
    assert [r.astimezone(BERLIN).date().isoformat() for r in runs] == [
        "2026-04-01",  # after Tuesday 31 March, two days after the change to CEST
        "2026-04-29",
        "2026-05-27",
        "2026-07-01",  # after Tuesday 30 June
        "2026-07-29",
    ]
    assert runs[0] == utc(2026, 4, 1, 1)  # 03:00 CEST


def test_a_negative_offset_moves_back_across_a_month_boundary() -> None:
    schedule = make(rrule="FREQ=MONTHLY;BYMONTHDAY=1;BYHOUR=3", offset_days=-1, timezone="UTC")
    assert next_runs(schedule, utc(2026, 1, 1), 3) == [
        utc(2026, 1, 31, 3),
        utc(2026, 2, 28, 3),
        utc(2026, 3, 31, 3),
    ]


@pytest.mark.parametrize(
    ("timezone", "cron", "after", "expected"),
    [
        # Berlin, spring forward 29 March 2026 02:00 CET -> 03:00 CEST: 02:30 does not exist
        # and runs at 03:00 CEST (01:00 UTC), the first valid instant after the gap.
        (
            "Europe/Berlin",
            "30 2 * * *",
            utc(2026, 3, 27),
            [
                utc(2026, 3, 27, 1, 30),
                utc(2026, 3, 28, 1, 30),
                utc(2026, 3, 29, 1),
                utc(2026, 3, 30, 0, 30),
            ],
        ),
        # Berlin, fall back 25 October 2026 03:00 CEST -> 02:00 CET: 02:30 happens twice and
        # runs once, at the first (CEST, 00:30 UTC).
        (
            "Europe/Berlin",
            "30 2 * * *",
            utc(2026, 10, 23, 12),
            [utc(2026, 10, 24, 0, 30), utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)],
        ),
        # New York, spring forward 8 March 2026 02:00 EST -> 03:00 EDT.
        (
            "America/New_York",
            "30 2 * * *",
            utc(2026, 3, 7),
            [utc(2026, 3, 7, 7, 30), utc(2026, 3, 8, 7), utc(2026, 3, 9, 6, 30)],
        ),
        # New York, fall back 1 November 2026 02:00 EDT -> 01:00 EST: 01:30 twice, run once.
        (
            "America/New_York",
            "30 1 * * *",
            utc(2026, 10, 31),
            [utc(2026, 10, 31, 5, 30), utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)],
        ),
        # Several fire times in one gap become one run; the repeated hour adds none.
        (
            "Europe/Berlin",
            "*/20 2 * * *",
            utc(2026, 3, 28, 12),
            [utc(2026, 3, 29, 1), utc(2026, 3, 30, 0), utc(2026, 3, 30, 0, 20)],
        ),
        (
            "Europe/Berlin",
            "0 * * * *",
            utc(2026, 10, 24, 22, 30),
            [utc(2026, 10, 24, 23), utc(2026, 10, 25, 0), utc(2026, 10, 25, 2)],
        ),
    ],
)
def test_daily_cron_across_daylight_saving_changes(
    timezone: str, cron: str, after: datetime, expected: list[datetime]
) -> None:
    assert next_runs(make(cron=cron, timezone=timezone), after, len(expected)) == expected


@pytest.mark.parametrize(
    ("timezone", "after", "expected"),
    [
        ("Europe/Berlin", utc(2026, 3, 28), [utc(2026, 3, 28, 2), utc(2026, 3, 29, 1)]),
        ("Europe/Berlin", utc(2026, 10, 24), [utc(2026, 10, 24, 1), utc(2026, 10, 25, 2)]),
        ("America/New_York", utc(2026, 3, 7), [utc(2026, 3, 7, 8), utc(2026, 3, 8, 7)]),
        ("America/New_York", utc(2026, 10, 31), [utc(2026, 10, 31, 7), utc(2026, 11, 1, 8)]),
    ],
)
def test_a_0300_rule_stays_at_0300_local_across_daylight_saving_changes(
    timezone: str, after: datetime, expected: list[datetime]
) -> None:
    schedule = make(rrule="FREQ=DAILY;BYHOUR=3;BYMINUTE=0", timezone=timezone)
    runs = next_runs(schedule, after, 2)
    assert runs == expected
    assert {r.astimezone(ZoneInfo(timezone)).strftime("%H:%M") for r in runs} == {"03:00"}


def test_an_rrule_time_in_the_gap_runs_when_the_gap_ends() -> None:
    schedule = make(rrule="FREQ=DAILY;BYHOUR=2;BYMINUTE=30", timezone="Europe/Berlin")
    assert next_runs(schedule, utc(2026, 3, 28, 12), 2) == [
        utc(2026, 3, 29, 1),
        utc(2026, 3, 30, 0, 30),
    ]


def test_to_utc_rules_for_gap_and_repeated_hour() -> None:
    assert to_utc(datetime(2026, 3, 29, 2, 30), BERLIN) == utc(2026, 3, 29, 1)
    assert to_utc(datetime(2026, 10, 25, 2, 30), BERLIN) == utc(2026, 10, 25, 0, 30)
    lord_howe = ZoneInfo("Australia/Lord_Howe")  # a half-hour change: 02:00 -> 02:30
    assert to_utc(datetime(2026, 10, 4, 2, 10), lord_howe) == utc(2026, 10, 3, 15, 30)


# Instants where a zone's offset changes in 2026 (found by a scan), for the property below.
_ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]


def _changes(name: str) -> list[datetime]:
    zone = ZoneInfo(name)
    found, at = [], utc(2026, 1, 1)
    step = timedelta(minutes=30)
    while at < utc(2027, 1, 1):
        if (at + step).astimezone(zone).utcoffset() != at.astimezone(zone).utcoffset():
            found.append(at + step)
        at += step
    return found or [utc(2026, 6, 1)]


_CHANGES = {name: _changes(name) for name in _ZONES}
_cron_fields = st.tuples(
    st.sampled_from(["0", "30", "15,45", "*/20", "5"]),
    st.sampled_from(["*", "0", "1", "2", "3", "1-3", "*/2", "23"]),
    st.sampled_from(["*", "*", "1", "25,29", "1-7"]),
    st.sampled_from(["*", "*", "3", "10"]),
    st.sampled_from(["*", "*", "0", "1-5"]),
)


def _matcher(cron: str) -> Callable[[datetime], bool]:
    """A fast stand-in for ``croniter.match`` (classic cron: day of month OR day of week)."""
    minutes, hours, days, months, weekdays = (
        None if values == ["*"] else set(values) for values in croniter(cron).expanded
    )

    def match(wall: datetime) -> bool:
        if minutes is not None and wall.minute not in minutes:
            return False
        if hours is not None and wall.hour not in hours:
            return False
        if months is not None and wall.month not in months:
            return False
        day_ok = days is None or wall.day in days
        weekday_ok = weekdays is None or (wall.weekday() + 1) % 7 in weekdays
        if days is not None and weekdays is not None:
            return day_ok or weekday_ok
        return day_ok and weekday_ok

    return match


def _expected_by_brute_force(
    cron: str, zone: ZoneInfo, after: datetime, end: datetime
) -> list[datetime]:
    """Every minute in (after, end] at which the rules above say the cron fires."""
    match = _matcher(cron)
    expected: set[datetime] = set()
    minute = timedelta(minutes=1)
    at = after + minute
    while at <= end:
        local = at.astimezone(zone)
        if local.fold == 0 and match(local.replace(tzinfo=None)):
            assert croniter.match(cron, local.replace(tzinfo=None))  # the stand-in agrees
            expected.add(at)
        wall = (at - minute).astimezone(zone).replace(tzinfo=None) + minute
        while wall < local.replace(tzinfo=None):  # a gap ends at `at`: its wall times
            if match(wall):
                assert croniter.match(cron, wall)  # the stand-in agrees
                expected.add(at)
            wall += minute
        at += minute
    return sorted(expected)


@settings(max_examples=60, deadline=None)
@given(
    fields=_cron_fields,
    name=st.sampled_from(_ZONES),
    index=st.integers(0, 3),
    shift=st.integers(-36 * 60, 12 * 60),
)
def test_property_cron_runs_increase_and_match_the_wall_clock(
    fields: tuple[str, ...], name: str, index: int, shift: int
) -> None:
    cron = " ".join(fields)
    changes = _CHANGES[name]
    after = changes[index % len(changes)] + timedelta(minutes=shift)
    end = after + timedelta(hours=48)
    schedule = make(cron=cron, timezone=name)
    runs = list(takewhile(lambda instant: instant <= end, iter_runs(schedule, after)))
    assert all(a < b for a, b in pairwise(runs))
    assert all(instant.tzinfo is UTC for instant in runs)
    assert runs == _expected_by_brute_force(cron, ZoneInfo(name), after, end)


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cron": "61 3 * * *"}, "bad cron expression"),
        ({"cron": "0 3 * *"}, "it needs 5"),
        ({"cron": "0 0 30 2 *"}, "bad cron expression"),
        ({"rrule": "FREQ=MINUTELY"}, "use a cron expression"),
        ({"rrule": "FREQ=MONTHLY;BYDAY=2XX"}, "bad recurrence rule"),
        ({"rrule": "BYDAY=TU"}, "has no FREQ"),
        ({"rrule": "DTSTART:20260101T000000\nRRULE:FREQ=DAILY"}, "one RRULE only"),
        ({"rrule": "FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=30"}, "never fires"),
        ({"cron": "0 3 * * *", "timezone": "Europe/Atlantis"}, "unknown time zone"),
        ({"cron": "0 3 * * *", "rrule": "FREQ=DAILY"}, "exactly one of"),
        ({}, "exactly one of"),
        ({"cron": "0 3 * * *", "offset_days": 1}, "offset_days goes with"),
        ({"cron": "0 3 * * *", "all": True}, "not both or neither"),
        ({"cron": "0 3 * * *", "nodes": []}, "not both or neither"),
        ({"cron": "0 3 * * *", "name": "no spaces"}, "name"),
        ({"cron": "0 3 * * *", "grace": 0}, "grace"),
        ({"cron": "0 3 * * *", "missed": "catch-up"}, "missed"),
    ],
)
def test_bad_schedules_are_refused_with_a_clear_reason(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        make(**fields)


def test_an_rrule_prefix_is_accepted_and_normalised() -> None:
    assert (
        make(rrule="rrule:freq=weekly;byday=mo;byhour=3").rrule == "FREQ=WEEKLY;BYDAY=MO;BYHOUR=3"
    )


# --- the missed-run policy --------------------------------------------------------------------

DAILY_0300 = {"cron": "0 3 * * *", "timezone": "UTC"}


def test_on_time_fire() -> None:
    schedule = make(**DAILY_0300)
    decision = due(schedule, utc(2026, 1, 10, 3), utc(2026, 1, 11, 3, 0, 2))
    assert (decision.fire, decision.instant, decision.missed) == (True, utc(2026, 1, 11, 3), False)
    assert decision.mark == utc(2026, 1, 11, 3)
    quiet = due(schedule, utc(2026, 1, 11, 3), utc(2026, 1, 11, 12))
    assert not quiet.fire
    assert quiet.mark is None
    assert "next fires at 2026-01-12 03:00 UTC" in quiet.reason


def test_run_once_fires_once_for_three_missed_runs() -> None:
    # Down from 10 January 12:00 to 13 January 03:30: the runs of the 11th, 12th, 13th missed.
    schedule = make(**DAILY_0300, missed="run-once")
    decision = due(schedule, utc(2026, 1, 10, 3), utc(2026, 1, 13, 3, 30))
    assert (decision.fire, decision.instant, decision.missed) == (True, utc(2026, 1, 13, 3), True)
    assert decision.dropped == 2
    assert "run-once" in decision.reason
    after = due(schedule, decision.mark, utc(2026, 1, 13, 3, 31))
    assert not after.fire  # once, not three times


def test_skip_fires_none_of_three_missed_runs() -> None:
    schedule = make(**DAILY_0300, missed="skip")
    decision = due(schedule, utc(2026, 1, 10, 3), utc(2026, 1, 13, 3, 30))
    assert (decision.fire, decision.missed, decision.dropped) == (False, True, 3)
    assert decision.mark == utc(2026, 1, 13, 3)
    assert not due(schedule, decision.mark, utc(2026, 1, 13, 3, 31)).fire
    assert due(schedule, decision.mark, utc(2026, 1, 14, 3)).fire  # the next one runs


def test_missed_runs_outside_grace_do_not_run() -> None:
    schedule = make(**DAILY_0300, missed="run-once", grace=timedelta(hours=6))
    decision = due(schedule, utc(2026, 1, 10, 3), utc(2026, 1, 13, 9, 30))
    assert (decision.fire, decision.missed) == (False, True)
    assert (decision.mark, decision.dropped) == (utc(2026, 1, 13, 3), 3)
    assert "more than 6:00:00 ago" in decision.reason
    # The same with nothing at all inside the window: a long outage with a short grace.
    weekly = make(cron="0 3 * * 1", timezone="UTC", grace=timedelta(hours=1))
    long_gone = due(weekly, utc(2026, 1, 5, 3), utc(2026, 1, 20, 12))
    assert (long_gone.fire, long_gone.mark, long_gone.dropped) == (False, utc(2026, 1, 19, 3), 2)


def test_a_slightly_late_wake_is_on_time_under_both_policies() -> None:
    for missed in ("run-once", "skip"):
        schedule = make(**DAILY_0300, missed=missed)
        decision = due(schedule, utc(2026, 1, 10, 3), utc(2026, 1, 11, 3) + ON_TIME)
        assert (decision.fire, decision.missed) == (True, False)


def test_disabled_never_fires_and_no_fire_before_created() -> None:
    schedule = make(**DAILY_0300, enabled=False)
    assert not due(schedule, None, utc(2026, 1, 11, 3)).fire
    fresh = make(**DAILY_0300, created=utc(2026, 1, 11, 4))
    assert not due(fresh, None, utc(2026, 1, 11, 4, 1)).fire


# --- the scheduler on an injected clock -------------------------------------------------------


class FakeClock:
    """A clock that jumps to each instant the scheduler sleeps until, up to ``end``.

    Before jumping it waits for ``before`` (the scheduler's idle) so that runs finish at
    their own instants; past ``end`` it parks until the test cancels the scheduler.
    """

    def __init__(self, start: datetime, end: datetime) -> None:
        self.current = start
        self.end = end
        self.finished = asyncio.Event()
        self.before: Callable[[], Awaitable[None]] | None = None

    def now(self) -> datetime:
        return self.current

    async def sleep_until(self, instant: datetime) -> None:
        if self.before is not None:
            await self.before()
        if instant > self.end:
            self.finished.set()
            await asyncio.get_running_loop().create_future()  # until cancelled
        self.current = max(self.current, instant)


class Fired:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[tuple[str, datetime, bool, datetime]] = []
        self.release: asyncio.Event | None = None

    async def __call__(self, schedule: Schedule, instant: datetime, missed: bool) -> None:
        self.calls.append((schedule.name, instant, missed, self.clock.now()))
        if self.release is not None:
            await self.release.wait()


async def drive(scheduler: Scheduler, clock: FakeClock) -> None:
    async with asyncio.timeout(20):
        task = asyncio.create_task(scheduler.run())
        await clock.finished.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def scheduler_for(
    start: datetime, end: datetime, store: MemorySchedules | None = None
) -> tuple[Scheduler, FakeClock, Fired, MemorySchedules]:
    clock = FakeClock(start, end)
    fired = Fired(clock)
    store = store or MemorySchedules()
    scheduler = Scheduler(store, fired, now=clock.now, sleep_until=clock.sleep_until)
    clock.before = scheduler.wait_idle
    return scheduler, clock, fired, store


async def test_scheduler_fires_at_each_instant_across_a_month_end_and_a_dst_change() -> None:
    scheduler, clock, fired, store = scheduler_for(utc(2026, 3, 1), utc(2026, 4, 30))
    await scheduler.add(
        scheduler.build(
            {
                "name": "after-last-tuesday",
                "rrule": "FREQ=MONTHLY;BYDAY=-1TU;BYHOUR=3;BYMINUTE=0",
                "offset_days": 1,
                "timezone": "Europe/Berlin",
                "all": True,
            }
        )
    )
    await scheduler.add(
        scheduler.build(
            {"name": "nightly", "cron": "30 2 * * *", "timezone": "Europe/Berlin", "nodes": ["b"]}
        )
    )
    await drive(scheduler, clock)
    monthly = [(i, at) for name, i, _, at in fired.calls if name == "after-last-tuesday"]
    assert monthly == [(utc(2026, 4, 1, 1), utc(2026, 4, 1, 1)), (utc(2026, 4, 29, 1),) * 2]
    nightly = [instant for name, instant, _, at in fired.calls if name == "nightly"]
    assert len(nightly) == 60  # every day from 1 March to 29 April
    assert nightly[27:30] == [utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1), utc(2026, 3, 30, 0, 30)]
    assert all(instant == at and not missed for _, instant, missed, at in fired.calls)
    assert [r.outcome for r in store.history("nightly", 2)] == ["started", "done"]


async def test_scheduler_runs_once_on_start_for_runs_missed_while_down() -> None:
    store = MemorySchedules()
    store.save_schedule(make(**DAILY_0300))
    store.set_last_fired("nightly", utc(2026, 1, 10, 3))
    scheduler, clock, fired, _ = scheduler_for(utc(2026, 1, 13, 10), utc(2026, 1, 15, 12), store)
    await drive(scheduler, clock)
    assert [(instant, missed) for _, instant, missed, _ in fired.calls] == [
        (utc(2026, 1, 13, 3), True),
        (utc(2026, 1, 14, 3), False),
        (utc(2026, 1, 15, 3), False),
    ]
    assert next(at for *_, at in fired.calls) == utc(2026, 1, 13, 10)


async def test_a_due_run_is_refused_while_another_is_in_progress() -> None:
    scheduler, clock, fired, store = scheduler_for(utc(2026, 1, 1), utc(2026, 1, 1, 5))
    clock.before = None  # let the clock run on while the first run is still going
    fired.release = asyncio.Event()
    await scheduler.add(make(name="first", cron="0 3 * * *", timezone="UTC"))
    await scheduler.add(make(name="second", cron="0 4 * * *", timezone="UTC"))
    async with asyncio.timeout(20):
        task = asyncio.create_task(scheduler.run())
        await clock.finished.wait()  # the clock is past 04:00, the first run still going
        assert scheduler.running == ("first", utc(2026, 1, 1, 3))
        fired.release.set()
        await scheduler.wait_idle()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [(name, instant) for name, instant, *_ in fired.calls] == [("first", utc(2026, 1, 1, 3))]
    assert [r.outcome for r in store.history("first")] == ["started", "done"]
    refused = store.history("second")
    assert [r.outcome for r in refused] == ["refused"]
    assert "the run of first" in refused[0].reason
    assert "not queued" in refused[0].reason
    assert store.last_fired("second") == utc(2026, 1, 1, 4)  # dealt with, not waiting


async def test_add_remove_enable_disable_and_listing() -> None:
    known = ["primary", "secondary"]
    scheduler = Scheduler(
        MemorySchedules(),
        Fired(FakeClock(CREATED, CREATED)),
        now=lambda: utc(2026, 1, 5),
        known_nodes=lambda: known,
    )
    await scheduler.add(scheduler.build({"name": "n", **DAILY_0300, "nodes": ["secondary"]}))
    with pytest.raises(UsageError, match="exists already"):
        await scheduler.add(scheduler.build({"name": "n", **DAILY_0300, "all": True}))
    with pytest.raises(UsageError, match="unknown node"):
        await scheduler.add(scheduler.build({"name": "m", **DAILY_0300, "nodes": ["ghost"]}))
    listed = await scheduler.listing(2)
    assert listed[0]["next_runs"] == [
        utc(2026, 1, 5, 3).isoformat(),
        utc(2026, 1, 6, 3).isoformat(),
    ]
    await scheduler.set_enabled("n", False)
    assert (await scheduler.listing())[0]["next_runs"] == []
    await scheduler.set_enabled("n", True)
    assert not due(scheduler.schedules()[0], utc(2026, 1, 5), utc(2026, 1, 5)).fire
    await scheduler.remove("n")
    assert scheduler.schedules() == []
    with pytest.raises(UsageError, match="no schedule named"):
        await scheduler.remove("n")


async def test_enabling_does_not_catch_up_on_runs_while_disabled() -> None:
    clock_now = [utc(2026, 1, 1)]
    scheduler = Scheduler(
        MemorySchedules(), Fired(FakeClock(CREATED, CREATED)), now=lambda: clock_now[0]
    )
    await scheduler.add(make(**DAILY_0300, enabled=False))
    clock_now[0] = utc(2026, 1, 4, 3, 30)
    await scheduler.set_enabled("nightly", True)
    decisions = dict(await scheduler.tick())
    assert not decisions["nightly"].fire


# --- persistence in the agent's state store ---------------------------------------------------


def test_store_backed_schedules_round_trip(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.db")
    try:
        store = StoreBackedSchedules(state)
        first = make(rrule=SECOND_TUESDAY_DAY_AFTER, offset_days=1, timezone="Europe/Berlin")
        second = make(name="weekly", cron="0 4 * * 6", all=True, nodes=[], delete_original=True)
        store.save_schedule(first)
        store.save_schedule(second)
        store.set_last_fired("nightly", utc(2026, 1, 14, 2))
        for number in range(105):
            store.record_run(RunRecord("weekly", "done", utc(2026, 1, 1), None, False, f"{number}"))
        again = StoreBackedSchedules(state)
        assert again.load_schedules() == [first, second]
        assert again.last_fired("nightly") == utc(2026, 1, 14, 2)
        assert [r.reason for r in again.history("weekly", 200)][:1] == ["5"]  # latest 100 kept
        again.delete_schedule("nightly")
        assert [s.name for s in again.load_schedules()] == ["weekly"]
        assert again.last_fired("nightly") is None
        state.set("reclone.schedules", state.get("reclone.schedules") | {"bad": {"name": "bad"}})
        assert [s.name for s in again.load_schedules()] == ["weekly"]  # a bad one is skipped
    finally:
        state.close()


# --- the API and the CLI ----------------------------------------------------------------------


@pytest.fixture
async def agent_socket(tmp_path: Path) -> AsyncIterator[tuple[Path, Scheduler]]:
    scheduler = Scheduler(
        MemorySchedules(),
        Fired(FakeClock(CREATED, CREATED)),
        now=lambda: utc(2026, 3, 1),
        known_nodes=lambda: ["primary", "secondary"],
    )
    app = web.Application(middlewares=[_authenticate])
    add_routes(app, lambda: scheduler)
    runner = web.AppRunner(app)
    await runner.setup()
    path = tmp_path / "agent.sock"
    await web.UnixSite(runner, str(path)).start()
    try:
        yield path, scheduler
    finally:
        await runner.cleanup()


async def _cli(*args: str) -> Any:
    runner = CliRunner(env={"COLUMNS": "200"})
    return await asyncio.to_thread(runner.invoke, cli.app, list(args))


async def test_cli_through_the_api(agent_socket: tuple[Path, Scheduler]) -> None:
    path, scheduler = agent_socket
    sock = ["--socket", str(path)]
    added = await _cli(
        "add", "patch-tuesday", "--rrule", SECOND_TUESDAY_DAY_AFTER, "--offset-days", "1",
        "--tz", "Europe/Berlin", "--node", "secondary", "--missed", "skip", *sock,
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    assert "patch-tuesday added" in added.output
    assert scheduler.schedules()[0].missed == "skip"
    again = await _cli("add", "patch-tuesday", "--cron", "0 3 * * *", "--all", *sock)
    assert isinstance(again.exception, UsageError)
    assert "exists already" in str(again.exception)
    listed = await _cli("list", "--json", "--count", "2", *sock)
    data = json.loads(listed.output)
    assert data["schedules"][0]["next_runs"] == [
        utc(2026, 3, 11, 2).isoformat(),
        utc(2026, 4, 15, 1).isoformat(),
    ]
    table = await _cli("list", *sock)
    assert "2026-03-11 03:00 CET" in table.output
    assert "02:00 UTC" in table.output
    assert (await _cli("disable", "patch-tuesday", *sock)).exit_code == 0
    assert not scheduler.schedules()[0].enabled
    assert (await _cli("enable", "patch-tuesday", *sock)).exit_code == 0
    missing = await _cli("remove", "nothing", *sock)
    assert "no schedule named 'nothing'" in str(missing.exception)
    assert (await _cli("remove", "patch-tuesday", *sock)).exit_code == 0
    assert scheduler.schedules() == []


async def test_the_api_refuses_bad_input_with_400(agent_socket: tuple[Path, Scheduler]) -> None:
    from stead.cli.client import AgentClient

    client = AgentClient(agent_socket[0])
    body = {"name": "x", "cron": "0 3 * * *", "nodes": ["ghost"]}
    with pytest.raises(UsageError, match="unknown node"):
        await asyncio.to_thread(client.call, "POST", "/v1/schedules", body)
    with pytest.raises(UsageError, match="count must be"):
        await asyncio.to_thread(client.call, "GET", "/v1/schedules?count=x")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--node", "secondary"], "exactly one of --cron"),
        (["--cron", "0 3 * * *", "--rrule", "FREQ=DAILY", "--all"], "exactly one of --cron"),
        (["--cron", "0 3 * * *", "--offset-days", "1", "--all"], "--offset-days goes with"),
        (["--cron", "0 3 * * *"], "--node NAME"),
        (["--cron", "0 3 * * *", "--all", "--node", "a"], "--node NAME"),
        (["--cron", "0 3 * * *", "--all", "--missed", "later"], "--missed must be"),
        (["--cron", "0 3 * * *", "--all", "--grace", "soon"], "not a duration"),
        (["--cron", "0 3 * * * *", "--all"], "it needs 5"),
        (["--rrule", "FREQ=FORTNIGHTLY", "--all"], "FREQ must be one of"),
        (["--cron", "0 3 * * *", "--all", "--tz", "Mars/Olympus"], "unknown time zone"),
    ],
)
def test_cli_add_validates_before_asking_the_agent(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        cli.app, ["add", "x", *args, "--socket", str(tmp_path / "none.sock")]
    )
    assert isinstance(result.exception, UsageError), result.output
    assert message in str(result.exception)


def test_cli_checks_node_names_against_the_cluster_file(tmp_path: Path) -> None:
    nodes = [{"name": name, "addresses": [f"198.18.0.{i + 1}"]} for i, name in enumerate("ab")]
    cluster = {
        "cluster": {"name": "prod", "id": "0123456789", "active": "a"},
        "protected": [{"path": "/srv"}],
        "public": {
            "hostname": "shop",
            "addresses": [{"address": "192.0.2.10/24", "interface": "eth0"}],
        },
        "nodes": nodes,
    }
    (tmp_path / "cluster.toml").write_text(tomlkit.dumps(cluster))
    assert cli.cluster_nodes(tmp_path) == ["a", "b"]
    socket = ["--socket", str(tmp_path / "none.sock"), "--config-dir", str(tmp_path)]
    bad = CliRunner().invoke(cli.app, ["add", "x", "--cron", "0 3 * * *", "--node", "c", *socket])
    assert "unknown node(s) c; the cluster has a, b" in str(bad.exception)
    good = CliRunner().invoke(cli.app, ["add", "x", "--cron", "0 3 * * *", "--node", "b", *socket])
    assert isinstance(good.exception, AgentUnavailable)  # valid: it went on to ask the agent


def test_durations_and_local_zone() -> None:
    assert cli.parse_duration("90m") == timedelta(minutes=90)
    assert cli.parse_duration("2d") == timedelta(days=2)
    assert cli.parse_duration("6") == timedelta(hours=6)
    assert ZoneInfo(cli.local_zone())
