"""Steady small writes on the active: change-to-applied lag, agent CPU and peak memory.

The writer (in the primary) records CLOCK_MONOTONIC once each new file is closed; a watcher
(inotify in the secondary) records when the name appears there (the applier renames files
into place). Baseline in the same run: one ``rsync`` of a single small file over the link,
what an lsyncd-style tool pays per batch at best.
"""

from __future__ import annotations

import json

from bench import labkit
from bench.labkit import PRIMARY, SECONDARY, Result

NAME = "lag"
GOAL = "p99 < 100 ms at 1,000 writes/s"
RATE = 1000
RSYNC_SAMPLES = 5


def run(quick: bool) -> Result:
    seconds = 10 if quick else 60
    total = RATE * seconds
    root = "/srv/lab/lag"
    result = Result(NAME, GOAL, "p99 lag / one rsync of a small file")
    with labkit.lab(NAME, disk_size="4G") as lab:
        lab.exec(PRIMARY, ["mkdir", "-p", root], check=True)
        lab.exec(PRIMARY, ["sh", "-c", f"echo x > {root}.one"], check=True)
        labkit.wait_sync_cli(lab)
        with labkit.rsync_daemon(lab) as url:
            one = [
                labkit.nodeop(lab, PRIMARY, "timed", "rsync", "-a", f"{root}.one", url)["seconds"]
                for _ in range(RSYNC_SAMPLES)
            ]
        pids = {node: labkit.agent_pid(lab, node) for node in (PRIMARY, SECONDARY)}
        cpu0 = {node: labkit.cpu_seconds(pid) for node, pid in pids.items()}
        writes, arrivals = lab.dir / "writes.json", lab.dir / "arrivals.json"
        watcher = labkit.nodeop_start(
            lab, SECONDARY, "lag-watch", root, total, seconds + 120, arrivals
        )
        try:
            writer = labkit.nodeop(lab, PRIMARY, "lag-write", root, RATE, seconds, writes)
            labkit.wait_sync_cli(lab)
            labkit.nodeop_finish(watcher, 150)
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait()
        cpu = {node: labkit.cpu_seconds(pid) - cpu0[node] for node, pid in pids.items()}
        mem = {node: labkit.memory(pid) for node, pid in pids.items()}
        written = json.loads(writes.read_text())
        arrived = json.loads(arrivals.read_text())
    lags = [arrived[name] - t for name, t in written.items() if name in arrived]
    p50, p99 = labkit.percentile(lags, 50), labkit.percentile(lags, 99)
    rsync_one = labkit.median(one)
    result.ratio = p99 / rsync_one
    result.met = p99 < 0.100 and len(lags) == len(written)
    result.figures = {
        "writes": f"{len(written):,} in {writer['seconds']:.1f} s ({writer['rate']:,.0f}/s)",
        "lag p50": f"{p50 * 1000:.1f} ms",
        "lag p99": f"{p99 * 1000:.1f} ms",
        "lag max": f"{max(lags) * 1000:.1f} ms",
        "arrived": f"{len(lags):,} of {len(written):,}",
        "one rsync of a small file": f"{rsync_one * 1000:.0f} ms (median of {RSYNC_SAMPLES})",
        "agent CPU primary": f"{cpu[PRIMARY]:.1f} s ({cpu[PRIMARY] / seconds:.0%} of a core)",
        "agent CPU secondary": f"{cpu[SECONDARY]:.1f} s ({cpu[SECONDARY] / seconds:.0%} of a core)",
        "peak RSS primary": labkit.mib(mem[PRIMARY]["VmHWM"]),
        "peak RSS secondary": labkit.mib(mem[SECONDARY]["VmHWM"]),
    }
    if writer["late"]:
        result.notes.append(f"writer was > 10 ms behind schedule on {writer['late']:,} writes")
    return result
