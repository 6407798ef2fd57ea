"""Reclone, the agent's part: the active orders and watches; each passive rebuilds itself.

A mixin of :class:`stead.agent.daemon.Agent`. On the active, :meth:`start_reclone` runs a
job that takes the nodes one at a time: it checks that another passive stays in sync
(unless forced), asks the node to rebuild its system trees (``reclone-start``, then
``reclone-status`` until it ends; see :mod:`stead.reclone.builtin`), then runs a full check
of the node's protected set, and records the run in the history. On a passive, the requests
start the :class:`~stead.reclone.builtin.Rebuilder`, report on it, or roll it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from datetime import datetime
from typing import Any

from stead.agent.base import AgentBase
from stead.agent.jobs import Job
from stead.channel import messages as m
from stead.channel.transport import Connection
from stead.errors import ChannelError, RecloneError, SteadError, UsageError
from stead.reclone.builtin import Rebuilder, source_for
from stead.reclone.providers import libvirt_provider_class
from stead.reclone.providers.base import CloneProvider
from stead.reclone.schedule import Schedule
from stead.reclone.scheduler import Scheduler, StoreBackedSchedules
from stead.reclone.swap import Swapper

log = logging.getLogger(__name__)

HISTORY_KEY = "reclone_history"
HISTORY_MAX = 200
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
POLL = 0.5
STATUS_POLL = 0.1  # the passive's progress: a reclone's end is seen within this
SHARE_SCHEDULES = 30.0  # seconds between two hand-overs of the schedules to the passives
RESTART_GRACE = 90.0  # a node that stops answering this long failed (its copy gives up at 30 s)


class Reclones(AgentBase):
    _rebuilder: Rebuilder | None = None
    _vm_provider: CloneProvider | None = None
    reclone_recovered: str = ""
    scheduler: Scheduler

    def init_reclones(self) -> None:
        self._schedules_changed = asyncio.Event()
        self.scheduler = Scheduler(
            StoreBackedSchedules(self.store),
            self._fire_schedule,
            known_nodes=lambda: [n.name for n in self.cluster.nodes],
            on_change=self._schedules_changed.set,
        )

    def start_scheduler(self, tasks: asyncio.TaskGroup) -> None:
        tasks.create_task(self.scheduler.run())
        tasks.create_task(self._share_schedules())

    async def _fire_schedule(self, schedule: Schedule, instant: datetime, missed: bool) -> None:
        """Every node keeps the clock of every schedule; only the active runs them."""
        if self.role != "active":
            log.info("schedule %s due at %s: the active runs it", schedule.name, instant)
            return
        trigger = f"schedule {schedule.name}" + (" (a run missed while down)" if missed else "")
        job = self.start_reclone(
            list(schedule.nodes),
            all_nodes=schedule.all,
            delete_original=schedule.delete_original,
            trigger=trigger,
        )
        if job.task is not None:
            await job.task
        if job.state != "done":
            raise RecloneError(job.error)

    async def _share_schedules(self) -> None:
        """The active hands its schedules and their last runs to every passive: a successor
        after a failover runs them on, and does not run again what already ran."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHARE_SCHEDULES):
                    await self._schedules_changed.wait()
            self._schedules_changed.clear()
            if self.role != "active":
                continue
            body = {"schedules": self.scheduler.export()}
            for peer in self.cluster.peers(self.me):
                try:
                    await self.membership.request(peer.name, "reclone-schedules", body, timeout=10)
                except SteadError as exc:
                    log.debug("schedules not shared with %s: %s", peer.name, exc)

    # ---- both roles --------------------------------------------------------------------

    def recover_reclone(self) -> None:
        """At start: finish a swap that was interrupted, or discard an interrupted staging."""
        self.reclone_recovered = Swapper(self.state_dir / "reclone").recover()
        if self.reclone_recovered:
            self.store.event("reclone", self.reclone_recovered, level="warning")
        history = self.reclone_history()
        if any(r.get("result") == "running" for r in history):
            for record in history:
                if record.get("result") == "running":
                    record.update(result="interrupted", error="the active agent stopped")
            self.store.set(HISTORY_KEY, history)

    @property
    def rebuilder(self) -> Rebuilder:
        if self._rebuilder is None:
            self._rebuilder = Rebuilder(
                me=self.me,
                cluster=self.cluster,
                state_dir=self.state_dir,
                ssl_context=self.client_ssl,
                hello=self._reclone_hello,
            )
        return self._rebuilder

    def _reclone_hello(self) -> m.Hello:
        return dataclasses.replace(self._hello(), purpose="reclone")

    async def serve_reclone(self, conn: Connection, hello: m.Hello) -> None:
        """A passive pulls the reclone scope from us (the active) on its own connection."""
        if self.role != "active":
            await conn.send(m.Error(code="role", message=f"{self.me} is not the active"))
            return
        await conn.send(self._reclone_hello())
        log.info("serving a reclone of %s", hello.node)
        await source_for(self.cluster, self.state_dir).serve(conn)

    def reclone_history(self) -> list[dict[str, Any]]:
        history = self.store.get(HISTORY_KEY, [])
        return list(history) if isinstance(history, list) else []

    def _record(self, record: dict[str, Any]) -> None:
        history = [r for r in self.reclone_history() if r.get("run") != record["run"]]
        history.append(record)
        self.store.set(HISTORY_KEY, history[-HISTORY_MAX:])

    # ---- the passive's side ------------------------------------------------------------

    async def answer_reclone(self, peer: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        if kind == "reclone-status":
            return {**self.rebuilder.state.describe(), "recovered": self.reclone_recovered}
        if self.role != "passive":
            raise RecloneError(f"{self.me} is the active; only a passive is recloned")
        if kind == "reclone-start":
            run = body.get("run")
            if not isinstance(run, str) or not RUN_ID.match(run):
                raise RecloneError(f"reclone-start: bad run id {run!r}")
            flags = [body.get("delete_original", False), body.get("dry_run", False)]
            if not all(isinstance(flag, bool) for flag in flags):
                raise RecloneError("reclone-start: delete_original and dry_run must be booleans")
            self.rebuilder.start(run, peer, delete_original=flags[0], dry_run=flags[1])
            self.store.event("reclone", f"reclone {run} from {peer} started")
            return {}
        if kind == "reclone-schedules":
            await self.scheduler.replace_all(body.get("schedules"))
            return {}
        if kind == "reclone-rollback":
            if self.rebuilder.busy:
                raise RecloneError(f"{self.me} is recloning; roll back once it is over")
            plan = await asyncio.to_thread(self.rebuilder.swapper.rollback)
            self.store.event("reclone", f"reclone {plan.run} rolled back", level="warning")
            return {"run": plan.run, "operations": len(plan.ops)}
        raise UsageError(f"unknown request {kind!r}")

    # ---- the active's side -------------------------------------------------------------

    async def rollback_reclone(self, node: str) -> dict[str, Any]:
        if self.role != "active":
            raise UsageError(f"{self.me} is passive; run the rollback on the active node")
        if node not in self.senders:
            raise UsageError(f"{node!r} is not a passive of this cluster")
        if self.cluster.reclone.provider == "libvirt":
            generation = await self._machines().rollback(node)
            self.store.event("reclone", f"{node}: machine of reclone {generation.run} restored")
            return {"node": node, "run": generation.run, "operations": generation.detail}
        answer = await self.membership.request(node, "reclone-rollback", {}, timeout=300)
        self.store.event("reclone", f"{node}: reclone {answer.get('run')} rolled back")
        return {"node": node, **answer}

    def start_reclone(
        self,
        nodes: list[str],
        *,
        all_nodes: bool = False,
        delete_original: bool = False,
        force: bool = False,
        dry_run: bool = False,
        trigger: str = "operator",
    ) -> Job:
        if self.role != "active":
            raise UsageError(f"{self.me} is passive; run the reclone on the active node")
        if all_nodes == bool(nodes):
            raise UsageError("name the nodes to reclone, or --all (not both)")
        for job in self.jobs.running():
            if job.kind == "reclone":
                raise RecloneError(f"a reclone is already running (job {job.id})")
        for name in nodes:
            if name not in self.senders:
                raise UsageError(f"{name!r} is not a passive of this cluster")
        if all_nodes:
            # The least preferred successor first: the best one stays in sync the longest.
            peers = sorted(self.cluster.peers(self.me), key=lambda n: (-n.priority, n.name))
            nodes = [n.name for n in peers if n.name in self.senders]
        params = {
            "nodes": nodes,
            "delete_original": delete_original,
            "force": force,
            "dry_run": dry_run,
            "trigger": trigger,
        }
        job = self.jobs.create("reclone", params)
        job.task = asyncio.get_running_loop().create_task(self._run_reclone(job))
        return job

    async def _run_reclone(self, job: Job) -> None:
        params = job.params
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        try:
            for name in params["nodes"]:
                run = f"{stamp}-{name}"
                job.progress = {"node": name, "phase": "gate"}
                result = await self._reclone_one(job, name, run)
                job.result[name] = result
            job.finish()
        except (SteadError, OSError) as exc:
            job.fail(_reason(exc))
            self.store.event("reclone", f"reclone stopped: {job.error}", level="error")
        except asyncio.CancelledError:
            job.fail("cancelled")
            raise

    async def _reclone_one(self, job: Job, name: str, run: str) -> dict[str, Any]:
        params = job.params
        record: dict[str, Any] = {
            "run": run,
            "node": name,
            "trigger": params["trigger"],
            "started": time.time(),
            "finished": None,
            "dry_run": params["dry_run"],
            "delete_original": params["delete_original"],
            "bytes": 0,
            "files": 0,
            "result": "running",
            "error": "",
        }
        if not params["dry_run"]:
            self._record(record)
        try:
            if not params["force"] and not params["dry_run"]:
                await self._reclone_gate(name)
            if self.cluster.reclone.provider == "libvirt":
                status = await self._clone_machine(job, name, run)
            else:
                status = await self._rebuild(job, name, run)
            progress = status.get("progress") or {}
            record.update(bytes=progress.get("bytes_done", 0), files=progress.get("files_done", 0))
            record["summary"] = status.get("summary", {})
            if not params["dry_run"]:
                job.progress = {"node": name, "phase": "check"}
                await self._check_protected(name)
            record["result"] = "ok"
            _finish(record)
            return {"status": status, **record}
        except (SteadError, OSError) as exc:
            record.update(result="failed", error=_reason(exc))
            raise RecloneError(f"{name}: {record['error']}") from exc
        finally:
            _finish(record)
            if not params["dry_run"]:
                self._record(record)
                self.store.event(
                    "reclone",
                    f"reclone {run} of {name}: {record['result']}"
                    + (f" ({record['error']})" if record["error"] else ""),
                    level="info" if record["result"] == "ok" else "error",
                )

    def _machines(self) -> CloneProvider:
        """The libvirt provider, one connection for the agent's lifetime."""
        if self._vm_provider is None:
            settings = self.cluster.reclone.libvirt
            assert settings is not None  # the schema requires it for provider libvirt
            self._vm_provider = libvirt_provider_class()(
                settings.uri,
                settings.domains,
                settings.preserve,
                shutdown_timeout=settings.shutdown_timeout,
            )
        return self._vm_provider

    async def _clone_machine(self, job: Job, name: str, run: str) -> dict[str, Any]:
        """The libvirt provider clones the active's machine into the node's."""
        provider = self._machines()
        delete = bool(job.params["delete_original"])
        if job.params["dry_run"]:
            plan = await provider.plan(name, active=self.me, run=run, delete_original=delete)
            return {"phase": "done", "summary": plan.summary, "steps": plan.steps}

        def progress(update: dict[str, Any]) -> None:
            job.progress = {"node": name, **update}

        result = await provider.clone(
            name, active=self.me, run=run, delete_original=delete, progress=progress
        )
        return {"phase": "done", **result.describe()}

    def _in_sync(self, name: str) -> bool:
        sender = self.senders.get(name)
        if sender is None:
            return False
        state = sender.state
        return state.connected and not (state.needs_check or state.checking)

    async def _reclone_gate(self, name: str) -> None:
        """Another passive stays in sync while ``name`` is rebuilt (or there is none)."""
        others = [n for n in self.senders if n != name]
        if not others:
            raise RecloneError(
                f"{name} is the only passive: recloning it leaves no in-sync passive "
                "(use --force to do it anyway)"
            )
        deadline = time.monotonic() + self.cluster.patch.gate_timeout
        while not any(self._in_sync(n) for n in others):
            if time.monotonic() > deadline:
                raise RecloneError(
                    f"no other passive is in sync ({', '.join(others)}); recloning {name} "
                    "would leave none (use --force to do it anyway)"
                )
            await asyncio.sleep(POLL)

    async def _rebuild(self, job: Job, name: str, run: str) -> dict[str, Any]:
        body = {
            "run": run,
            "delete_original": job.params["delete_original"],
            "dry_run": job.params["dry_run"],
        }
        await self.membership.request(name, "reclone-start", body, timeout=10)
        silent_since: float | None = None
        while True:
            await asyncio.sleep(STATUS_POLL)
            try:
                status = await self.membership.request(name, "reclone-status", {}, timeout=10)
            except ChannelError as exc:
                now = time.monotonic()
                silent_since = silent_since or now
                if now - silent_since > RESTART_GRACE:
                    raise RecloneError(f"{name} stopped answering: {exc}") from exc
                continue
            silent_since = None
            if status.get("run") != run:
                recovered = status.get("recovered") or "no interrupted reclone found"
                raise RecloneError(f"{name} restarted during the reclone: {recovered}")
            job.progress = {"node": name, **status}
            if status.get("phase") == "failed":
                raise RecloneError(str(status.get("error") or "failed"))
            if status.get("phase") == "done":
                return status

    async def _check_protected(self, name: str) -> None:
        """A full check of the node's protected set: its repairs go through the journal."""
        deadline = time.monotonic() + self.cluster.patch.gate_timeout
        while True:
            try:
                check = self.start_check(node=name, fast=False)
                break
            except UsageError as exc:  # a check of it already runs, or it is reconnecting
                if time.monotonic() > deadline:
                    raise RecloneError(f"cannot check {name}'s protected set: {exc}") from exc
                await asyncio.sleep(POLL)
        if check.task is not None:
            await check.task
        if check.state != "done":
            raise RecloneError(f"the check of {name}'s protected set failed: {check.error}")


def _reason(exc: BaseException) -> str:
    """The message alone, without the error class's template around it."""
    if isinstance(exc, SteadError):
        return str(exc.kwargs.get("message") or exc)
    return str(exc) or type(exc).__name__


def _finish(record: dict[str, Any]) -> None:
    record["finished"] = time.time()
    record["duration"] = round(record["finished"] - record["started"], 3)
