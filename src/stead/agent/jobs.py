"""Long operator requests (checks, reclones, switchovers) run as jobs that the CLI follows.

``GET /v1/jobs/{id}?wait=S`` answers as soon as the job ends, or after ``S`` seconds with
its progress so far: a client follows a job without sleeping between questions, and learns
of its end at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

MAX_JOBS = 100
MAX_WAIT = 30.0  # seconds one question may wait for a job's end


@dataclass
class Job:
    id: int
    kind: str
    params: dict[str, Any]
    state: str = "running"
    started: float = field(default_factory=time.time)
    finished: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    task: asyncio.Task[None] | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def finish(self) -> None:
        self.state, self.finished = "done", time.time()
        self.ended.set()

    def fail(self, error: str) -> None:
        self.state, self.finished, self.error = "failed", time.time(), error
        self.ended.set()

    async def wait(self, seconds: float) -> None:
        """Return once the job has ended, or after ``seconds`` (at most :data:`MAX_WAIT`)."""
        if self.state == "running" and seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ended.wait(), min(seconds, MAX_WAIT))

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "params": self.params,
            "state": self.state,
            "started": self.started,
            "finished": self.finished,
            "progress": self.progress,
            "result": self.result,
            "error": self.error,
        }


class JobTable:
    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)

    def create(self, kind: str, params: dict[str, Any]) -> Job:
        job = Job(next(self._ids), kind, params)
        self._jobs[job.id] = job
        finished = [i for i, j in self._jobs.items() if j.state != "running"]
        for job_id in finished[: max(0, len(self._jobs) - MAX_JOBS)]:
            del self._jobs[job_id]  # oldest finished first; a running job is never forgotten
        return job

    def running(self) -> list[Job]:
        return [job for job in self._jobs.values() if job.state == "running"]

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)
