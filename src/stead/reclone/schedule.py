"""Reclone schedules: when they fire, as pure functions of a rule, a time zone and a clock.

A schedule names its fire times in one of two ways:

- ``cron``: a five-field cron expression (minute, hour, day of month, month, day of week) or
  one of ``@hourly``, ``@daily``, ``@weekly``, ``@monthly``, ``@yearly``. As in classic cron, a
  restricted day of month and a restricted day of week are alternatives (either matches).
- ``rrule``: an RFC 5545 recurrence rule such as ``FREQ=MONTHLY;BYDAY=+2TU;BYHOUR=3;BYMINUTE=0``
  (the second Tuesday of every month at 03:00), with ``offset_days`` to move every occurrence
  by whole days: ``offset_days=1`` on that rule gives "the day after the second Tuesday of
  every month at 03:00". The offset moves the calendar date and keeps the wall-clock time, so
  an occurrence on the last day of a month moves into the next month (``BYDAY=-1TU`` with
  ``offset_days=1`` fires on 1 April 2026, after Tuesday 31 March). The rule's start
  (RFC 5545's DTSTART) is 00:00:00 on the day the schedule was created, in its time zone: what
  the rule leaves out comes from there (midnight when BYHOUR/BYMINUTE are missing, the
  creation weekday for a WEEKLY rule without BYDAY, the creation day for a MONTHLY rule
  without BYDAY or BYMONTHDAY), and INTERVAL counts from there. Rules finer than HOURLY are
  refused (use cron), and so are DTSTART, RDATE and EXDATE lines.

Times are wall-clock times in the schedule's IANA time zone, so a 03:00 run stays at 03:00
local time across daylight-saving changes. Where the zone's clock jumps:

- spring forward (a local time that does not exist, such as 02:30 in Berlin on the last Sunday
  of March): the run happens at the first valid instant after the gap, the moment of the
  change (03:00 local time in Berlin). Several fire times inside one gap become one run.
- fall back (a local time that happens twice, such as 02:30 in Berlin on the last Sunday of
  October): the run happens once, at the first occurrence. The repeated hour adds no runs.

Every function returns aware UTC instants, strictly increasing.

:func:`due` decides, when the scheduler wakes up, whether a schedule fires now. A fire time
seen at most :data:`ON_TIME` after it passed runs as usual (the agent merely woke late). Fire
times that passed while the agent was down follow the schedule's ``missed`` policy:

- ``run-once`` (the default): run once now, standing for the latest missed fire time, if that
  time is at most ``grace`` ago (default 24 hours); older ones are dropped.
- ``skip``: drop them all; the next run is the next fire time.

Either way several missed fire times never cause several runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter
from dateutil.rrule import rrule as RecurrenceRule
from dateutil.rrule import rrulestr
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from stead.errors import UsageError

ON_TIME = timedelta(minutes=5)
"""A fire time noticed at most this long after it passed is on time, not missed."""

MAX_GRACE = timedelta(days=7)
COUNT_LIMIT = 1000
"""Missed fire times beyond the grace window are counted up to this many."""
DEFAULT_GRACE = timedelta(hours=24)
CRON_ALIASES = ("@hourly", "@daily", "@weekly", "@monthly", "@yearly", "@annually", "@midnight")
RRULE_FREQUENCIES = ("YEARLY", "MONTHLY", "WEEKLY", "DAILY", "HOURLY")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"

# Wall times are searched from this far before the local time of ``after``: more than any
# offset change a zone has had, so that no fire time near a change is overlooked.
_SLACK = timedelta(hours=3)


def zone_of(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; ValueError if there is no such zone."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r} (use an IANA name such as Europe/Berlin)"
        ) from None


def normalise_cron(expression: str) -> str:
    """``expression`` checked and with single spaces; ValueError naming what is wrong."""
    text = " ".join(expression.split())
    if text.lower() in CRON_ALIASES:
        return text.lower()
    fields = text.split(" ")
    if len(fields) != 5:
        raise ValueError(
            f"cron expression {expression!r} has {len(fields)} field(s); it needs 5: "
            "minute hour day-of-month month day-of-week (for example '0 3 * * *')"
        )
    try:
        croniter(text, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterError as exc:
        raise ValueError(f"bad cron expression {expression!r}: {exc}") from None
    return text


def normalise_rrule(rule: str) -> str:
    """``rule`` checked, upper case, without an ``RRULE:`` prefix; ValueError if bad."""
    text = rule.strip()
    if "\n" in text or ":" in text.removeprefix("RRULE:").removeprefix("rrule:"):
        raise ValueError(
            f"recurrence rule {rule!r}: give one RRULE only, without DTSTART, RDATE or EXDATE"
        )
    text = text.split(":", 1)[1] if ":" in text else text
    text = text.upper().strip().strip(";")
    parts: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"recurrence rule {rule!r}: {part!r} is not KEY=VALUE")
        parts[key.strip()] = value.strip()
    freq = parts.get("FREQ")
    if freq is None:
        raise ValueError(f"recurrence rule {rule!r} has no FREQ (for example FREQ=MONTHLY)")
    if freq not in RRULE_FREQUENCIES:
        raise ValueError(
            f"recurrence rule {rule!r}: FREQ must be one of {', '.join(RRULE_FREQUENCIES)}"
            " (use a cron expression for runs more often than hourly)"
        )
    try:
        parsed = rrulestr(text, dtstart=datetime(2000, 1, 1))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"bad recurrence rule {rule!r}: {exc}") from None
    if not isinstance(parsed, RecurrenceRule):  # pragma: no cover - one RRULE gives one rule
        raise ValueError(f"recurrence rule {rule!r}: give one RRULE only")
    return text


class Schedule(BaseModel):
    """One reclone schedule: when (cron or rrule, in a time zone), whom, and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="Short identifier, unique per cluster.")
    cron: str | None = None
    rrule: str | None = None
    offset_days: int = Field(0, ge=-31, le=31, description="Days added to each rrule date.")
    timezone: str = "UTC"
    nodes: list[str] = Field(default_factory=list)
    all: bool = Field(False, description="Every passive node at the time of the run.")
    delete_original: bool = False
    missed: Literal["run-once", "skip"] = "run-once"
    grace: timedelta = DEFAULT_GRACE
    enabled: bool = True
    created: AwareDatetime

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return None if value is None else normalise_cron(value)

    @field_validator("rrule")
    @classmethod
    def _rrule(cls, value: str | None) -> str | None:
        return None if value is None else normalise_rrule(value)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        zone_of(value)
        return value

    @field_validator("created")
    @classmethod
    def _created(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, value: list[str]) -> list[str]:
        if any(not node.strip() for node in value):
            raise ValueError("a node name is empty")
        if len(set(value)) != len(value):
            raise ValueError(f"nodes named twice in {value}")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> Schedule:
        if (self.cron is None) == (self.rrule is None):
            raise ValueError("give exactly one of a cron expression and a recurrence rule")
        if self.offset_days and self.rrule is None:
            raise ValueError("offset_days goes with a recurrence rule, not with cron")
        if bool(self.nodes) == self.all:
            raise ValueError("give either the nodes to reclone or all, not both or neither")
        if not timedelta(0) < self.grace <= MAX_GRACE:
            raise ValueError(f"grace must be more than 0 and at most {MAX_GRACE}")
        if self.rrule is not None and _first_wall_time(self) is None:
            raise ValueError(f"recurrence rule {self.rrule!r} never fires after {self.created}")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return zone_of(self.timezone)

    def describe(self) -> str:
        """The rule as one short line: ``cron 0 3 * * *`` or ``rrule ... +1 day(s)``."""
        if self.cron is not None:
            return f"cron {self.cron}"
        offset = f" {self.offset_days:+d} day(s)" if self.offset_days else ""
        return f"rrule {self.rrule}{offset}"

    def targets(self) -> str:
        return "all passives" if self.all else ", ".join(self.nodes)


def parse_schedule(data: dict[str, Any]) -> Schedule:
    """A Schedule from untrusted data; UsageError with one line per problem."""
    try:
        return Schedule.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        raise UsageError("; ".join(problems)) from None


def to_utc(wall: datetime, zone: ZoneInfo) -> datetime:
    """The UTC instant of naive local time ``wall`` in ``zone``, by the rules above.

    An ambiguous time maps to its first occurrence; a time in a gap maps to the end of the gap
    (the instant of the change), found by bisection over whole seconds.
    """
    early = wall.replace(tzinfo=zone, fold=0)
    late = wall.replace(tzinfo=zone, fold=1)
    first = early.astimezone(UTC)
    if early.utcoffset() == late.utcoffset():
        return first
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        return first  # exists twice: the first occurrence
    after_change = late.utcoffset()
    low = int(late.astimezone(UTC).timestamp())  # before the change
    high = int(first.timestamp())  # after the change
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, zone).utcoffset() == after_change:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


def _rule(schedule: Schedule) -> RecurrenceRule:
    start = schedule.created.astimezone(schedule.zone).replace(tzinfo=None)
    anchor = start.replace(hour=0, minute=0, second=0, microsecond=0)
    parsed = rrulestr(schedule.rrule or "", dtstart=anchor)
    assert isinstance(parsed, RecurrenceRule)
    return parsed


def _wall_times(schedule: Schedule, start: datetime) -> Iterator[datetime]:
    """Naive local fire times from about ``start`` on, in increasing order."""
    if schedule.cron is not None:
        cron = croniter(schedule.cron, start)
        while True:
            try:
                found: datetime = cron.get_next(datetime)
            except CroniterError:  # no further date (a rule such as 30 February)
                return
            yield found
    shift = timedelta(days=schedule.offset_days)
    for found in _rule(schedule).xafter(start - shift, inc=True):
        yield found + shift


def _first_wall_time(schedule: Schedule) -> datetime | None:
    start = schedule.created.astimezone(schedule.zone).replace(tzinfo=None)
    return next(_wall_times(schedule, start), None)


def iter_runs(schedule: Schedule, after: datetime) -> Iterator[datetime]:
    """Fire times strictly after aware ``after``, as aware UTC instants, strictly increasing."""
    if after.tzinfo is None:
        raise ValueError("after must be an aware datetime")
    zone = schedule.zone
    after = after.astimezone(UTC)
    start = after.astimezone(zone).replace(tzinfo=None) - _SLACK
    last = after
    for wall in _wall_times(schedule, start):
        instant = to_utc(wall, zone)
        if instant > last:
            last = instant
            yield instant


def next_runs(schedule: Schedule, after: datetime, count: int) -> list[datetime]:
    """The next ``count`` fire times strictly after ``after`` (fewer if the rule ends)."""
    found: list[datetime] = []
    if count <= 0:
        return found
    for instant in iter_runs(schedule, after):
        found.append(instant)
        if len(found) >= count:
            break
    return found


@dataclass(frozen=True, slots=True)
class Decision:
    """What :func:`due` found: whether to fire, for which fire time, and why.

    ``mark`` is the latest fire time now dealt with (run or dropped); the scheduler stores it
    as the schedule's last fired time so that it is never considered again. ``dropped`` counts
    the fire times that will not run (missed, beyond grace, or under the skip policy).
    """

    fire: bool
    reason: str
    instant: datetime | None = None
    missed: bool = False
    dropped: int = 0
    mark: datetime | None = None


def _at(instant: datetime, zone: ZoneInfo) -> str:
    return instant.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")


def due(schedule: Schedule, last_fired: datetime | None, now: datetime) -> Decision:
    """Whether ``schedule`` fires at ``now``, given the last fire time dealt with."""
    if not schedule.enabled:
        return Decision(False, f"schedule {schedule.name} is disabled")
    zone = schedule.zone
    baseline = schedule.created if last_fired is None else max(last_fired, schedule.created)
    first = next_runs(schedule, baseline, 1)
    if not first:
        return Decision(False, f"schedule {schedule.name} has no further fire times")
    if first[0] > now:
        return Decision(False, f"schedule {schedule.name} next fires at {_at(first[0], zone)}")
    lookback = max(schedule.grace, ON_TIME)
    window_start = max(baseline, now - lookback)
    recent: list[datetime] = []
    for instant in iter_runs(schedule, window_start):
        if instant > now:
            break
        recent.append(instant)
    older = 0  # due fire times before the window, counted up to a bound
    latest_older = None
    for instant in iter_runs(schedule, baseline):
        if instant > window_start or older >= COUNT_LIMIT:
            break
        older += 1
        latest_older = instant
    more = "+" if older >= COUNT_LIMIT else ""
    if not recent:
        return Decision(
            False,
            f"schedule {schedule.name}: {older}{more} missed run(s) since {_at(first[0], zone)},"
            f" all more than {schedule.grace} ago: none runs",
            instant=latest_older,
            missed=True,
            dropped=older,
            mark=now if more else latest_older,
        )
    latest = recent[-1]
    earlier = len(recent) - 1 + older
    note = f" ({earlier}{more} earlier missed run(s) dropped)" if earlier else ""
    if now - latest <= ON_TIME:
        return Decision(
            True,
            f"schedule {schedule.name} fires for {_at(latest, zone)}{note}",
            instant=latest,
            dropped=earlier,
            mark=latest,
        )
    if schedule.missed == "run-once" and now - latest <= schedule.grace:
        return Decision(
            True,
            f"schedule {schedule.name} runs once for the missed run at {_at(latest, zone)}"
            f" (policy run-once){note}",
            instant=latest,
            missed=True,
            dropped=earlier,
            mark=latest,
        )
    why = "policy skip" if schedule.missed == "skip" else f"more than {schedule.grace} ago"
    return Decision(
        False,
        f"schedule {schedule.name}: missed run at {_at(latest, zone)} not run ({why}){note}",
        instant=latest,
        missed=True,
        dropped=earlier + 1,
        mark=latest,
    )
