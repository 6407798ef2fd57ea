"""The reclone scheduler: an asyncio loop that fires schedules at their instants.

Time comes from two injected callables, ``now()`` (an aware UTC datetime) and
``sleep_until(instant)`` (an awaitable), so that tests jump the clock instead of sleeping.
The decision for each schedule is :func:`stead.reclone.schedule.due`; this module acts on it.

Rules the loop keeps:

- **No overlap.** While a run of any schedule is in progress (its ``fire`` callback has not
  returned), a schedule that falls due is refused: the refusal is recorded in its history
  with the reason, and it is not queued. A reclone takes long and changes a node wholesale;
  two at once, or one queued behind another that then runs at an unplanned hour, is worse
  than one refused run that the operator sees.
- **At most once.** A fire time is stored as dealt with (``set_last_fired``) before its
  ``fire`` callback starts, so an agent that dies during a run does not run it again on
  start; runs missed while the agent was down follow the schedule's ``missed`` policy.
- **Enabling does not catch up.** Enabling a schedule marks everything up to now as dealt
  with; fire times that passed while it was disabled do not count as missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from stead.aio import TaskGroup, cancel_and_wait
from stead.errors import NotFound as UnknownSchedule
from stead.errors import UsageError
from stead.reclone.schedule import Decision, Schedule, due, next_runs, parse_schedule

log = logging.getLogger(__name__)

Now = Callable[[], datetime]
SleepUntil = Callable[[datetime], Awaitable[None]]
Fire = Callable[[Schedule, datetime, bool], Awaitable[None]]
Outcome = Literal["started", "done", "failed", "refused", "dropped"]

HISTORY_LIMIT = 100
_REAL_SLEEP_STEP = 60.0


def utc_now() -> datetime:
    return datetime.now(UTC)


async def sleep_until(instant: datetime) -> None:
    """Sleep until ``instant`` by the system clock, checking it at least once a minute.

    Short steps notice a changed system clock or a resumed suspend within a minute.
    """
    # The condition is the clock itself, which no event announces.
    while (left := (instant - utc_now()).total_seconds()) > 0:  # noqa: ASYNC110
        await asyncio.sleep(min(left, _REAL_SLEEP_STEP))


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One line of a schedule's history: a run started, ended, or did not happen."""

    schedule: str
    outcome: Outcome
    at: datetime
    instant: datetime | None
    missed: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule,
            "outcome": self.outcome,
            "at": self.at.isoformat(),
            "instant": self.instant.isoformat() if self.instant else None,
            "missed": self.missed,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        instant = data.get("instant")
        return cls(
            schedule=str(data["schedule"]),
            outcome=data["outcome"],
            at=datetime.fromisoformat(data["at"]),
            instant=datetime.fromisoformat(instant) if instant else None,
            missed=bool(data.get("missed", False)),
            reason=str(data.get("reason", "")),
        )


class ScheduleStore(Protocol):
    """Where schedules, their last fired times and their history persist.

    Timing: every method may block (SQLite with fsync); the scheduler calls them in a worker
    thread, one at a time. Atomicity: ``save_schedule`` and ``delete_schedule`` each replace
    or remove one schedule whole; ``delete_schedule`` also forgets its last fired time.
    Durability: a ``set_last_fired`` that returned survives a crash; the at-most-once rule
    depends on it. ``record_run`` may keep only the latest records (at least 20 per schedule).
    """

    def load_schedules(self) -> list[Schedule]: ...

    def save_schedule(self, schedule: Schedule) -> None: ...

    def delete_schedule(self, name: str) -> None: ...

    def last_fired(self, name: str) -> datetime | None: ...

    def set_last_fired(self, name: str, instant: datetime) -> None: ...

    def record_run(self, record: RunRecord) -> None: ...

    def history(self, name: str, limit: int = 20) -> list[RunRecord]: ...


class MemorySchedules:
    """A ScheduleStore in memory: for tests, and for an agent without a state store."""

    def __init__(self) -> None:
        self.schedules: dict[str, Schedule] = {}
        self.fired: dict[str, datetime] = {}
        self.records: dict[str, list[RunRecord]] = {}

    def load_schedules(self) -> list[Schedule]:
        return list(self.schedules.values())

    def save_schedule(self, schedule: Schedule) -> None:
        self.schedules[schedule.name] = schedule

    def delete_schedule(self, name: str) -> None:
        self.schedules.pop(name, None)
        self.fired.pop(name, None)

    def last_fired(self, name: str) -> datetime | None:
        return self.fired.get(name)

    def set_last_fired(self, name: str, instant: datetime) -> None:
        self.fired[name] = instant

    def record_run(self, record: RunRecord) -> None:
        kept = self.records.setdefault(record.schedule, [])
        kept.append(record)
        del kept[:-HISTORY_LIMIT]

    def history(self, name: str, limit: int = 20) -> list[RunRecord]:
        return self.records.get(name, [])[-limit:]


class KeyValueStore(Protocol):
    """The part of :class:`stead.store.db.StateStore` that schedules use."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def set(self, key: str, value: Any) -> None: ...


SCHEDULES_KEY = "reclone.schedules"
LAST_FIRED_KEY = "reclone.schedule.last_fired:{name}"
HISTORY_KEY = "reclone.schedule.history:{name}"


class StoreBackedSchedules:
    """A ScheduleStore on the agent's state store, through its ``get`` and ``set`` only.

    Keys: ``reclone.schedules`` holds every schedule as JSON by name (one key, so that a save
    replaces one schedule whole); ``reclone.schedule.last_fired:NAME`` an ISO instant;
    ``reclone.schedule.history:NAME`` the latest :data:`HISTORY_LIMIT` run records. A lock
    makes each read-modify-write atomic within the process.
    """

    def __init__(self, store: KeyValueStore) -> None:
        self._store = store
        self._lock = threading.Lock()

    def load_schedules(self) -> list[Schedule]:
        found = []
        for name, data in sorted((self._store.get(SCHEDULES_KEY) or {}).items()):
            try:
                found.append(parse_schedule(data))
            except UsageError as exc:  # a zone gone from tzdata, say: keep the others running
                log.error("stored schedule %s is not valid any more, ignored: %s", name, exc)
        return found

    def save_schedule(self, schedule: Schedule) -> None:
        with self._lock:
            stored = dict(self._store.get(SCHEDULES_KEY) or {})
            stored[schedule.name] = schedule.model_dump(mode="json")
            self._store.set(SCHEDULES_KEY, stored)

    def delete_schedule(self, name: str) -> None:
        with self._lock:
            stored = dict(self._store.get(SCHEDULES_KEY) or {})
            stored.pop(name, None)
            self._store.set(SCHEDULES_KEY, stored)
            self._store.set(LAST_FIRED_KEY.format(name=name), None)

    def last_fired(self, name: str) -> datetime | None:
        value = self._store.get(LAST_FIRED_KEY.format(name=name))
        return datetime.fromisoformat(value) if value else None

    def set_last_fired(self, name: str, instant: datetime) -> None:
        self._store.set(LAST_FIRED_KEY.format(name=name), instant.isoformat())

    def record_run(self, record: RunRecord) -> None:
        key = HISTORY_KEY.format(name=record.schedule)
        with self._lock:
            kept = list(self._store.get(key) or [])
            kept.append(record.to_json())
            self._store.set(key, kept[-HISTORY_LIMIT:])

    def history(self, name: str, limit: int = 20) -> list[RunRecord]:
        kept = self._store.get(HISTORY_KEY.format(name=name)) or []
        return [RunRecord.from_json(item) for item in kept[-limit:]]


@dataclass(frozen=True, slots=True)
class _Run:
    schedule: str
    instant: datetime
    task: asyncio.Task[None]


class Scheduler:
    """Fires reclone schedules; owns their in-memory state; persists through a store."""

    def __init__(
        self,
        store: ScheduleStore,
        fire: Fire,
        *,
        now: Now = utc_now,
        sleep_until: SleepUntil = sleep_until,
        known_nodes: Callable[[], Collection[str]] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.now = now
        self._on_change = on_change
        self._store = store
        self._fire = fire
        self._sleep_until = sleep_until
        self._known_nodes = known_nodes
        self._schedules: dict[str, Schedule] = {}
        self._last_fired: dict[str, datetime | None] = {}
        self._running: _Run | None = None
        self._loaded = False
        self._changed = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None

    async def load(self) -> None:
        """Read the stored schedules and their last fired times (``run`` does this itself)."""
        schedules = await asyncio.to_thread(self._store.load_schedules)
        for schedule in schedules:
            self._schedules[schedule.name] = schedule
            self._last_fired[schedule.name] = await asyncio.to_thread(
                self._store.last_fired, schedule.name
            )
        self._loaded = True

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Fire schedules until cancelled; a run in progress is cancelled with it."""
        if not self._loaded:
            await self.load()
        async with TaskGroup() as group:
            self._group = group
            try:
                while True:
                    self._changed.clear()
                    await self.tick()
                    await self._wait(self._next_wake())
            finally:
                self._group = None

    async def tick(self) -> list[tuple[str, Decision]]:
        """Decide for every schedule at ``now()`` and act; the decisions, by schedule name."""
        now = self.now()
        decisions = []
        for name in sorted(self._schedules):
            schedule = self._schedules.get(name)
            if schedule is None:  # removed while this tick waited for the store
                continue
            decision = due(schedule, self._last_fired.get(name), now)
            decisions.append((name, decision))
            if decision.mark is not None:
                self._last_fired[name] = decision.mark
                await asyncio.to_thread(self._store.set_last_fired, name, decision.mark)
            if decision.fire and decision.instant is not None:
                await self._start(schedule, decision, now)
            elif decision.dropped:
                log.warning("%s", decision.reason)
                await self._record(schedule, "dropped", now, decision, decision.reason)
        return decisions

    async def _start(self, schedule: Schedule, decision: Decision, now: datetime) -> None:
        assert decision.instant is not None
        running = self._running
        if running is not None:
            reason = (
                f"schedule {schedule.name} refused for {decision.instant.isoformat()}: the run"
                f" of {running.schedule} for {running.instant.isoformat()} is still in progress"
                " (runs never overlap and are not queued)"
            )
            log.warning("%s", reason)
            await self._record(schedule, "refused", now, decision, reason)
            return
        log.info("%s", decision.reason)
        await self._record(schedule, "started", now, decision, decision.reason)
        coroutine = self._execute(schedule, decision.instant, decision.missed)
        group = self._group
        task = group.create_task(coroutine) if group else asyncio.create_task(coroutine)
        self._running = _Run(schedule.name, decision.instant, task)

    async def _execute(self, schedule: Schedule, instant: datetime, missed: bool) -> None:
        outcome: Outcome = "done"
        reason = f"schedule {schedule.name} run for {instant.isoformat()} done"
        try:
            await self._fire(schedule, instant, missed)
        except asyncio.CancelledError:
            self._running = None
            raise
        except Exception as exc:
            outcome = "failed"
            reason = f"schedule {schedule.name} run for {instant.isoformat()} failed: {exc}"
            log.error("%s", reason)
        self._running = None
        record = RunRecord(schedule.name, outcome, self.now(), instant, missed, reason)
        await asyncio.to_thread(self._store.record_run, record)

    async def _record(
        self, schedule: Schedule, outcome: Outcome, now: datetime, decision: Decision, reason: str
    ) -> None:
        record = RunRecord(schedule.name, outcome, now, decision.instant, decision.missed, reason)
        await asyncio.to_thread(self._store.record_run, record)

    def _next_wake(self) -> datetime | None:
        now = self.now()
        wakes = []
        for name, schedule in self._schedules.items():
            if not schedule.enabled:
                continue
            last = self._last_fired.get(name)
            found = next_runs(schedule, max(now, last) if last else now, 1)
            wakes.extend(found)
        return min(wakes, default=None)

    async def _wait(self, wake: datetime | None) -> None:
        """Until ``wake`` or until the schedules change, whichever comes first."""
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._changed.wait())]
        if wake is not None:
            waiters.append(asyncio.ensure_future(self._sleep_until(wake)))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()  # all at once: a cancellation of ours mid-way leaves none
            for waiter in waiters:
                await cancel_and_wait(waiter)

    async def wait_idle(self) -> None:
        """Until no run is in progress (returns at once when none is)."""
        running = self._running
        if running is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(running.task)

    @property
    def running(self) -> tuple[str, datetime] | None:
        """The schedule and fire time of the run in progress, if any."""
        return (self._running.schedule, self._running.instant) if self._running else None

    # --- management -----------------------------------------------------------------------

    def build(self, data: dict[str, Any]) -> Schedule:
        """A new schedule from request data, created now (a ``created`` in data is ignored)."""
        return parse_schedule({**data, "created": self.now().isoformat()})

    async def add(self, schedule: Schedule) -> Schedule:
        """Add a new schedule; UsageError for a name in use or a node the cluster lacks."""
        if schedule.name in self._schedules:
            raise UsageError(f"a schedule named {schedule.name!r} exists already")
        if self._known_nodes is not None and schedule.nodes:
            known = set(self._known_nodes())
            unknown = [node for node in schedule.nodes if node not in known]
            if unknown:
                raise UsageError(
                    f"unknown node(s) {', '.join(unknown)}; the cluster has"
                    f" {', '.join(sorted(known)) or 'no nodes'}"
                )
        await asyncio.to_thread(self._store.save_schedule, schedule)
        self._schedules[schedule.name] = schedule
        self._last_fired[schedule.name] = None
        self._changed.set()
        log.info(
            "schedule %s added: %s for %s", schedule.name, schedule.describe(), schedule.targets()
        )
        self._notify()
        return schedule

    def _notify(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def _get(self, name: str) -> Schedule:
        try:
            return self._schedules[name]
        except KeyError:
            raise UnknownSchedule(f"no schedule named {name!r}") from None

    async def remove(self, name: str) -> None:
        self._get(name)
        await asyncio.to_thread(self._store.delete_schedule, name)
        del self._schedules[name]
        self._last_fired.pop(name, None)
        self._changed.set()
        log.info("schedule %s removed", name)
        self._notify()

    async def set_enabled(self, name: str, enabled: bool) -> Schedule:
        """Enable or disable a schedule; enabling marks fire times up to now as dealt with."""
        schedule = self._get(name).model_copy(update={"enabled": enabled})
        await asyncio.to_thread(self._store.save_schedule, schedule)
        if enabled and not self._schedules[name].enabled:
            mark = self.now()
            await asyncio.to_thread(self._store.set_last_fired, name, mark)
            self._last_fired[name] = mark
        self._schedules[name] = schedule
        self._changed.set()
        log.info("schedule %s %s", name, "enabled" if enabled else "disabled")
        self._notify()
        return schedule

    # --- copies on other nodes ------------------------------------------------------------

    def export(self) -> list[dict[str, Any]]:
        """Every schedule with its last fired time: what the active hands its passives."""
        out = []
        for schedule in self.schedules():
            last = self._last_fired.get(schedule.name)
            out.append(
                {
                    "schedule": schedule.model_dump(mode="json"),
                    "last_fired": last.isoformat() if last else None,
                }
            )
        return out

    async def replace_all(self, exported: Any) -> None:
        """Take the active's schedules (from :meth:`export`), so that a successor after a
        failover runs them on, without running again what the active ran already."""
        if not isinstance(exported, list):
            raise UsageError("schedules: expected a list")
        incoming: dict[str, tuple[Schedule, datetime | None]] = {}
        for item in exported:
            if not isinstance(item, dict) or not isinstance(item.get("schedule"), dict):
                raise UsageError("schedules: each item holds a schedule")
            schedule = parse_schedule(item["schedule"])
            last = item.get("last_fired")
            try:
                fired = datetime.fromisoformat(last) if isinstance(last, str) else None
            except ValueError:
                raise UsageError(f"schedules: bad last_fired {last!r}") from None
            if fired is not None and fired.tzinfo is None:
                raise UsageError(f"schedules: last_fired {last!r} has no time zone")
            incoming[schedule.name] = (schedule, fired)
        for name in [n for n in self._schedules if n not in incoming]:
            await asyncio.to_thread(self._store.delete_schedule, name)
            del self._schedules[name]
            self._last_fired.pop(name, None)
        for name, (schedule, fired) in incoming.items():
            if self._schedules.get(name) != schedule:
                await asyncio.to_thread(self._store.save_schedule, schedule)
                self._schedules[name] = schedule
            ours = self._last_fired.get(name)
            if fired is not None and (ours is None or fired > ours):
                await asyncio.to_thread(self._store.set_last_fired, name, fired)
                self._last_fired[name] = fired
            self._last_fired.setdefault(name, None)
        self._changed.set()

    def schedules(self) -> list[Schedule]:
        return [self._schedules[name] for name in sorted(self._schedules)]

    async def listing(self, count: int = 3) -> list[dict[str, Any]]:
        """Every schedule as JSON, with its next ``count`` runs, last fired time and last run."""
        now = self.now()
        listed = []
        for schedule in self.schedules():
            last = self._last_fired.get(schedule.name)
            upcoming = (
                next_runs(schedule, max(now, last) if last else now, count)
                if schedule.enabled
                else []
            )
            history = await asyncio.to_thread(self._store.history, schedule.name, 1)
            running = self._running
            listed.append(
                schedule.model_dump(mode="json")
                | {
                    "rule": schedule.describe(),
                    "next_runs": [instant.isoformat() for instant in upcoming],
                    "last_fired": last.isoformat() if last else None,
                    "last_run": history[-1].to_json() if history else None,
                    "running": running is not None and running.schedule == schedule.name,
                }
            )
        return listed
