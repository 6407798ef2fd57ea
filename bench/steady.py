"""No false failover while the active is fully loaded.

Both cores are kept busy inside the active node (two busy loops) and its disk is flooded
with small synchronous writes (an fsync storm in the protected path), for 10 minutes (60 s
with --quick), with default settings. A false failover is any change of the active or of
any node's epoch. The ratio is the longest heartbeat gap seen by the passives against the
failover timeout (below 1 means no passive came close to acting).
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench import labkit
from bench.failover import active
from bench.labkit import Result

NAME = "steady"
GOAL = "no false failover in 10 min of a fully loaded active (both cores, fsync storm)"

BUSY = "while True: pass"
STORM = r"""
import os, sys, time
root = sys.argv[1]
os.makedirs(root, exist_ok=True)
i = 0
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    i += 1
    path = os.path.join(root, f"s{i % 1000}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, b"x" * 4096)
    os.fsync(fd)
    os.close(fd)
"""


def run(quick: bool) -> Result:
    seconds = 60 if quick else 600
    result = Result(NAME, GOAL, "longest heartbeat gap / failover.timeout")
    with labkit.lab(NAME, nodes=3, disk_size="2G") as lab:
        leader = active(lab)
        before = {n: labkit.agent_status(lab, n)["epoch"] for n in lab.nodes}
        timeout = float(labkit.agent_status(lab, leader)["failover_timeout"])
        load = [
            lab.popen(leader, [sys.executable, "-c", BUSY]),
            lab.popen(leader, [sys.executable, "-c", BUSY]),
            lab.popen(leader, [sys.executable, "-c", STORM, "/srv/lab/storm", str(seconds)]),
        ]
        worst_gap = 0.0
        changes = 0
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                for node in lab.nodes:
                    data = labkit.agent_status(lab, node)
                    if data["role"] == "active" and node != leader:
                        changes += 1
                    if data["epoch"] != before[node]:
                        changes += 1
                    age = (data["roles"]["membership"].get(leader) or {}).get("heartbeat_age")
                    if node != leader and age is not None:
                        worst_gap = max(worst_gap, float(age))
                time.sleep(0.2)  # sampling other processes' state over time
        finally:
            for proc in load:
                proc.kill()
                proc.wait()
        subprocess.run(["sync"], check=False)
    result.ratio = worst_gap / timeout
    result.met = changes == 0
    result.figures = {
        "duration": f"{seconds} s, both cores busy plus fsync storm on {leader}",
        "false failovers (role or epoch changes)": str(changes),
        "longest heartbeat age seen by a passive": f"{worst_gap:.2f} s (timeout {timeout:g} s)",
    }
    return result
