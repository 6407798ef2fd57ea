"""Switchover time with 1,000 writes per second running, and the client requests that fail.

A client in the lab's client namespace PUTs to the demo service on the public address at
1,000 requests per second (each request has a 0.5 s timeout); meanwhile ``stead
switchover`` moves the role back and forth. The ratio is the switchover time against the
failover timeout (what an unplanned move would cost before it even starts).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from typing import Any

from bench import labkit
from bench.failover import HTTPLOAD, URL, active
from bench.labkit import Result
from stead.lab.nodes import Lab

NAME = "switchover"
GOAL = "planned role change with 1,000 writes/s: every acknowledged write kept, few failures"
RATE = 1000
RATES = [RATE, 100]  # what the issue asks for; what this lab's demo service sustains


def run(quick: bool) -> Result:
    moves = 2 if quick else 6
    result = Result(NAME, GOAL, "switchover time / failover.timeout (1,000 writes/s)")
    with labkit.lab(NAME, nodes=3, disk_size="2G") as lab:
        configured = float(labkit.agent_status(lab, active(lab))["failover_timeout"])
        for rate in RATES:
            figures, durations, clean = under_load(lab, rate, moves)
            result.figures.update({f"{rate}/s offered: {k}": v for k, v in figures.items()})
            if rate == RATE:
                result.ratio = max(durations) / configured
                result.met = clean
    return result


def under_load(lab: Lab, rate: int, moves: int) -> tuple[dict[str, str], list[float], bool]:
    """Switch over ``moves`` times while the client offers ``rate`` writes per second."""
    out = lab.dir / f"switchover-load-{rate}.json"
    client = lab.popen(
        "client",
        [sys.executable, HTTPLOAD, URL, str(rate), "600", str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    labkit.read_line(client.stdout, 30)
    time.sleep(2.0)  # load before the first move
    durations, windows = [], []
    job: dict[str, Any] = {}
    for _ in range(moves):
        source = active(lab)
        target = "secondary" if source != "secondary" else "primary"
        started = time.time()
        proc = lab.exec(source, ["stead", "switchover", "--to", target, "--json"], capture=True)
        if proc.returncode != 0:
            raise RuntimeError(f"switchover failed: {proc.stderr}")
        job = json.loads(proc.stdout)
        durations.append(time.time() - started)
        windows.append((started, time.time()))
        time.sleep(2.0)  # load on the new active before the next move
    client.terminate()
    client.communicate(timeout=120)
    data = json.loads(out.read_text())
    steps = {step["step"]: step["seconds"] for step in job["result"]["steps"]}
    writes = sorted(data["writes"])
    failed = [t for t, ok in writes if not ok]
    in_moves = [t for t in failed if any(a - 1.0 <= t <= b + 1.0 for a, b in windows)]
    span = writes[-1][0] - writes[0][0] if writes else 1.0
    ok = sum(1 for _, good in writes if good)
    outages = [outage(writes, a, b) for a, b in windows]
    figures = {
        "switchover (CLI, end to end)": ", ".join(f"{d:.2f} s" for d in durations),
        "last switchover steps": ", ".join(f"{k} {v:.3f} s" for k, v in steps.items()),
        "writes acknowledged": f"{ok / span:,.0f}/s of {len(writes):,} sent",
        "failed writes": f"{len(failed)} ({len(in_moves)} within 1 s of a switchover)",
        "write outage per switchover": ", ".join(f"{o:.2f} s" for o in outages),
    }
    return figures, durations, len(failed) == len(in_moves)


def outage(writes: list[list[Any]], start: float, end: float) -> float:
    """Longest gap between acknowledged writes (by send time) around one move."""
    times = [t for t, ok in writes if ok and start - 1.0 <= t <= end + 2.0]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return max(gaps, default=end - start)
