"""Agent memory with 1,000,000 protected files, the active alone after a fresh initial scan.

The files are made while every agent is stopped; the primary's state is wiped, so its agent
starts as on a first start and journals all of them. Baseline in the same run: the RSS of a
bare Python process that imported the agent's module.
"""

from __future__ import annotations

import os
import shutil
import time

from bench import labkit
from bench.labkit import MIB, PRIMARY, Result
from stead.cli.client import AgentClient
from stead.errors import LabError

NAME = "memory"
GOAL = "agent RSS < 300 MiB"
LIMIT = 300 * MIB
PER_DIR = 1000


def run(quick: bool) -> Result:
    files = 100_000 if quick else 1_000_000
    result = Result(NAME, GOAL, "peak RSS / 300 MiB")
    baseline = labkit.bare_import_rss()
    with labkit.lab(NAME, disk_size="8G") as lab:
        for node in reversed(lab.nodes):  # passives first: measure the active alone
            lab.stop(node)
        made = labkit.nodeop(lab, PRIMARY, "touch", "/srv/lab/many", files, PER_DIR, timeout=900)
        fs = os.statvfs(lab.node_fs_path(PRIMARY))
        state = lab.paths(PRIMARY).state
        shutil.rmtree(state)
        state.mkdir()
        start = time.monotonic()
        try:
            lab.start(PRIMARY)
        except LabError as exc:
            # The API socket opens only once the initial scan is done, which takes longer
            # than the lab's readiness bound: keep waiting for it here.
            if "did not open" not in str(exc):
                raise
        client = AgentClient(lab.socket_path(PRIMARY), timeout=10)

        def scanned() -> bool:
            return any(e.get("kind") == "initial-scan" for e in _events(client))

        labkit.poll(scanned, 900, "the initial scan", interval=0.5)
        scan_s = time.monotonic() - start
        pid = labkit.agent_pid(lab, PRIMARY)
        mem = labkit.memory(pid)
        status = labkit.agent_status(lab)
    peak, rss = mem["VmHWM"], mem["VmRSS"]
    delta = peak - baseline
    result.ratio = peak / LIMIT
    result.met = peak < LIMIT
    result.figures = {
        "files": f"{made['files']:,} empty files in {files // PER_DIR:,} dirs",
        "peak RSS (VmHWM)": labkit.mib(peak),
        "RSS after scan (VmRSS)": labkit.mib(rss),
        "bare import RSS (baseline)": labkit.mib(baseline),
        "peak - baseline": f"{labkit.mib(delta)} ({delta / files:,.0f} B/file)",
        "initial scan": f"{labkit.secs(scan_s)} ({files / scan_s:,.0f} files/s)",
        "journal after scan": labkit.mib(status["journal"]["bytes"]),
        "inodes used / free": f"{fs.f_files - fs.f_ffree:,} / {fs.f_ffree:,}",
    }
    return result


def _events(client: AgentClient) -> list[dict[str, object]]:
    found = client.call("GET", "/v1/events?limit=50")
    return list(found if isinstance(found, list) else found.get("events", []))
