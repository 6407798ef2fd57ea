"""The real seams of a rolling patch: the agents' APIs and a subprocess runner.

``ClusterAgents`` finds the current active among the agents it can reach. On a lab host it
reaches every node's API socket; on a node, only its own. When the active is a node without
a socket here (on a real cluster, after the switchover from the node running ``stead
patch``), it is asked through ``patch.connect``, running ``stead status --json``, ``stead
wait-sync`` and ``stead switchover`` there (``stead`` must be on that login's PATH).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stead.cli.client import AgentClient
from stead.errors import AgentUnavailable, SteadError, TimeoutExpired
from stead.patching.run import CommandResult

JOB_WAIT_SECONDS = 5.0  # a job question returns at its end or after this
JOB_RETRY_SECONDS = 0.1
STATUS_TIMEOUT = 10.0
KILL_GRACE_SECONDS = 5.0

RemoteRun = Callable[[str, str, float], CommandResult]  # (node, shell text, timeout)


class SocketAgent:
    """One agent on its Unix socket."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def status(self) -> dict[str, Any]:
        return dict(AgentClient(self.path, timeout=STATUS_TIMEOUT).call("GET", "/v1/status"))

    def wait_sync(self, timeout: float) -> dict[str, Any]:
        client = AgentClient(self.path, timeout=timeout + 10)
        return dict(client.call("POST", "/v1/wait-sync", {"timeout": timeout}))

    def switchover(self, to: str, timeout: float) -> dict[str, Any]:
        client = AgentClient(self.path, timeout=30)
        job = dict(client.call("POST", "/v1/switchover", {"to": to}))
        deadline = time.monotonic() + timeout
        while job.get("state") == "running":
            if time.monotonic() > deadline:
                raise TimeoutExpired(f"the switchover to {to} still runs after {timeout:g} s")
            try:
                job = dict(client.call("GET", f"/v1/jobs/{job['id']}?wait={JOB_WAIT_SECONDS}"))
            except SteadError:  # the API may be busy while the agent changes role: ask again
                time.sleep(JOB_RETRY_SECONDS)  # it cannot be asked now: nothing to await
                continue
        if job.get("state") != "done":
            raise SteadError(f"the switchover to {to} failed: {job.get('error')}")
        return job


class RemoteAgent:
    """One agent asked through ``patch.connect``: the ``stead`` CLI on that node."""

    def __init__(self, node: str, run: RemoteRun) -> None:
        self.node = node
        self._run = run

    def _call(self, argv: list[str], timeout: float) -> CommandResult:
        result = self._run(self.node, shlex.join(argv), timeout)
        if result.error or result.timed_out:
            why = result.error or f"no answer within {timeout:g} s"
            raise AgentUnavailable(why, where=f"{self.node} (through patch.connect)")
        return result

    def status(self) -> dict[str, Any]:
        result = self._call(["stead", "status", "--json"], STATUS_TIMEOUT + 20)
        try:
            data = json.loads(result.output)
        except ValueError:
            data = None
        if result.returncode != 0 or not isinstance(data, dict):
            raise AgentUnavailable(
                f"`stead status --json` said: {result.output.strip()[-300:]}",
                where=f"{self.node} (through patch.connect)",
            )
        return data

    def wait_sync(self, timeout: float) -> dict[str, Any]:
        result = self._call(["stead", "wait-sync", "--timeout", f"{timeout:g}"], timeout + 30)
        if result.returncode != 0:
            raise TimeoutExpired(f"wait-sync on {self.node}: {result.output.strip()[-300:]}")
        return {"head": None, "nodes": {}}

    def switchover(self, to: str, timeout: float) -> dict[str, Any]:
        argv = ["stead", "switchover", "--to", to, "--json", "--timeout", f"{timeout:g}"]
        result = self._call(argv, timeout + 60)
        try:
            job = json.loads(result.output[result.output.find("{") :])
        except ValueError:
            job = {}
        if result.returncode != 0 or job.get("state") != "done":
            error = job.get("error") or result.output.strip()[-300:]
            raise SteadError(f"the switchover to {to} failed: {error}")
        return dict(job)


class ClusterAgents:
    """The cluster's current active, found among the reachable agents at every call."""

    def __init__(self, sockets: dict[str, Path], remote: RemoteRun | None = None) -> None:
        self.sockets = dict(sockets)
        self.remote = remote
        self._last: str | None = None  # asked first: the active rarely changes

    def _agent(self, node: str) -> SocketAgent | RemoteAgent:
        if node in self.sockets:
            return SocketAgent(self.sockets[node])
        if self.remote is None:
            raise AgentUnavailable("no socket here", where=node)
        return RemoteAgent(node, self.remote)

    def _active(self) -> tuple[SocketAgent | RemoteAgent, dict[str, Any]]:
        order = sorted(self.sockets, key=lambda name: name != self._last)
        named: str | None = None
        problems = []
        for name in order:
            agent = SocketAgent(self.sockets[name])
            try:
                status = agent.status()
            except SteadError as exc:
                problems.append(f"{name}: {exc}")
                continue
            if status.get("role") == "active":
                self._last = name
                return agent, status
            me = (status.get("nodes") or [{}])[0]
            named = named or me.get("active")
        if named and named not in self.sockets and self.remote is not None:
            remote = RemoteAgent(named, self.remote)
            status = remote.status()
            if status.get("role") == "active":
                return remote, status
            problems.append(f"{named}: answers as {status.get('role')}")
        raise AgentUnavailable(
            "no agent answers as the active" + (f" ({'; '.join(problems)})" if problems else ""),
            where=", ".join(self.sockets) or "nowhere",
        )

    def status(self) -> dict[str, Any]:
        return self._active()[1]

    def wait_sync(self, timeout: float) -> dict[str, Any]:
        return self._active()[0].wait_sync(timeout)

    def switchover(self, to: str, timeout: float) -> dict[str, Any]:
        return self._active()[0].switchover(to, timeout)


class SubprocessRunner:
    """Runs a command in its own session, so that a Ctrl-C on the terminal does not reach
    it (the orchestrator stops between steps); a timeout or an exception kills its group."""

    def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            return CommandResult(None, "", error=f"{argv[0]}: {exc.strerror or exc}")
        timed_out = False
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
            out, _ = proc.communicate()
        except BaseException:
            _kill(proc)
            proc.communicate()
            raise
        return CommandResult(
            None if timed_out else proc.returncode,
            out.decode(errors="replace"),
            seconds=time.monotonic() - started,
            timed_out=timed_out,
        )


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the command's process group, then SIGKILL to whatever is left of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE_SECONDS)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their parent too
    proc.wait()
