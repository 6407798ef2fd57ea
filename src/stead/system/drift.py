"""``stead drift`` as the active runs it: its own snapshot against each passive's.

:func:`run_drift` takes the active's snapshot and fetches every passive's at the same time
(each over its own heartbeat links, see :mod:`stead.system.snapshot`), then compares them.
The result is plain data (the API returns it as JSON): per passive a state, ``in step`` or
``drifted`` with the differences, or ``unreachable`` / ``failed`` with the reason. A passive
that cannot be compared never hides the others' results; only a failure on the active
itself fails the whole run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any

from stead.aio import TaskGroup, first_cause
from stead.errors import SteadError
from stead.system.compare import compare
from stead.system.snapshot import Ask, Snapshot, fetch_snapshot

IN_STEP = "in step"
DRIFTED = "drifted"
UNREACHABLE = "unreachable"
FAILED = "failed"


async def run_drift(
    *,
    active: str,
    passives: list[str],
    local: Callable[[bool, bool], Coroutine[Any, Any, Snapshot]],
    ask: Callable[[str], Ask],
    connected: Callable[[str], bool],
    trees: bool = True,
    packages: bool = True,
) -> dict[str, Any]:
    """Compare the active with each of ``passives``.

    ``local(trees, packages)`` takes the active's own snapshot; ``ask(name)`` is how to
    send one request to that passive (``body, timeout -> reply body``); ``connected(name)``
    says whether a link to it is up at all (if not, it is reported unreachable unasked).
    """
    started = time.monotonic()
    fetched: dict[str, Snapshot | str] = {}

    async def fetch(name: str) -> None:
        if not connected(name):
            fetched[name] = "no heartbeat link to it is up"
            return
        try:
            fetched[name] = await fetch_snapshot(ask(name), trees=trees, packages=packages)
        except SteadError as exc:
            fetched[name] = str(exc)

    try:
        async with TaskGroup() as tasks:
            mine = tasks.create_task(local(trees, packages))
            for name in passives:
                tasks.create_task(fetch(name))
    except BaseExceptionGroup as group:
        raise first_cause(group) from None
    own = mine.result()
    nodes = {name: _node_result(own, fetched[name], connected(name)) for name in passives}
    return {
        "active": active,
        "trees": trees,
        "packages": packages,
        "manager": own.manager,
        "scope": own.scope,
        "missing": own.manifest.missing if own.manifest else [],
        "seconds": round(time.monotonic() - started, 3),
        "nodes": nodes,
    }


def _node_result(own: Snapshot, theirs: Snapshot | str, linked: bool) -> dict[str, Any]:
    if isinstance(theirs, str):
        return {"state": FAILED if linked else UNREACHABLE, "error": theirs}
    drift = compare(
        own.packages,
        theirs.packages,
        own.manifest,
        theirs.manifest,
    )
    warnings = []
    if theirs.scope != own.scope:
        warnings.append(
            "its [system] trees, exclude, preserve or protected paths differ from the "
            "active's: the cluster files are not the same"
        )
    if own.packages is not None and theirs.manager != own.manager:
        warnings.append(f"it lists packages with {theirs.manager}, the active with {own.manager}")
    if theirs.manifest is not None:
        warnings += [f"{tree} does not exist there" for tree in theirs.manifest.missing]
    return {
        "state": IN_STEP if drift.in_step else DRIFTED,
        "error": "",
        **drift.to_json(),
        "warnings": warnings,
        "seconds": theirs.seconds,
    }
