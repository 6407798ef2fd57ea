"""Choosing a capture backend: fanotify where the kernel allows it, inotify otherwise.

``make_capture(..., backend="auto")`` probes once, when the agent starts: fanotify is used
when ``fanotify_init`` accepts file-handle reporting with names (``FAN_REPORT_DFID_NAME``,
``FAN_REPORT_TARGET_FID``), every root's file system takes a filesystem mark with
``FAN_RENAME`` (Linux 5.17+, ``CAP_SYS_ADMIN``), and its file handles can be opened again
(``CAP_DAC_READ_SEARCH``, a file system that supports them), and every root is a mount
point, since a filesystem mark sees the whole file system. Otherwise inotify. The choice
and its reason are logged once. Nothing here is timing-critical; the probe leaves no mark.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from stead.replication.capture.core import EventCapture
from stead.replication.capture.fanotify import FanotifyCapture, probe
from stead.replication.capture.inotify import InotifyCapture
from stead.replication.filters import Filter
from stead.replication.manifest import Manifest

log = logging.getLogger(__name__)

Backend = Literal["auto", "fanotify", "inotify"]


def choose_backend(roots: dict[str, Path], backend: Backend = "auto") -> tuple[str, str]:
    """The backend to use for ``roots`` and why, as ``(name, reason)``."""
    if backend == "inotify":
        return "inotify", "configured"
    if backend == "fanotify":
        return "fanotify", "configured"
    paths = [os.fspath(path) for _, path in sorted(roots.items())]
    shared = [p for p in paths if not os.path.ismount(p)]
    if shared:
        # A filesystem mark sees the whole file system: on a root that shares its file
        # system (with / say), every unrelated write would fill the event queue.
        return "inotify", f"{shared[0]} is not a mount point; its file system is shared"
    why_not = probe(paths)
    if why_not is None:
        return "fanotify", "filesystem marks with file handles work on every root"
    return "inotify", f"fanotify unusable: {why_not}"


def make_capture(
    roots: dict[str, Path],
    filters: dict[str, Filter],
    manifest: Manifest | None,
    backend: Backend = "auto",
    *,
    coalesce: float = 0.005,
    scan_on_start: bool = False,
    on_overflow: Callable[[], None] | None = None,
) -> EventCapture[Any]:
    """A capture backend for ``roots`` (``InotifyCapture`` or ``FanotifyCapture``)."""
    name, reason = choose_backend(roots, backend)
    log.info("capture: %s (%s)", name, reason)
    cls: type[EventCapture[Any]] = FanotifyCapture if name == "fanotify" else InotifyCapture
    return cls(
        roots,
        filters,
        manifest,
        coalesce=coalesce,
        scan_on_start=scan_on_start,
        on_overflow=on_overflow,
    )
