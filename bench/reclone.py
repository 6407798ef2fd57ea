"""Reclone of a 2 GiB, 50,000-file scope: onto an empty passive, then when 95 % is identical.

The data set lives in the active's system tree ``/opt/lab/bench`` (the lab's system trees
are on a per-node image of their own; see ``stead.lab.holder``): 49,800 small files of
0-16 KiB (uniform, mean 8 KiB, about 389 MiB), in directories of 1,000, and 200 large files
that make up the rest to exactly 2 GiB (about 8.3 MiB each). Every byte comes from
``os.urandom``, so that the channel's compression cannot help stead against rsync.
``--quick``: 200 MiB, 4,980 small and 20 large files.

Baseline, same run: ``rsync -a`` from an rsync daemon in the active (module on
``/opt/lab/bench``, on the active's channel address) into an empty directory of the
passive's system image (the same file system the reclone writes to), run in the passive,
then ``sync -f`` of that file system: stead's swap ends with ``os.sync()``, so both times
include making the copy durable. Page caches are not dropped: before each timed part the
host runs ``sync`` (earlier dirty data is not charged to it), the active's data is warm in
its page cache for both (2 GiB of 24), and the passive's copy is written out within the
timed part for both. The rsync copy is removed (untimed) before the reclone, whose target
``/opt/lab/bench`` on the passive does not exist beforehand.

Stead's time is the wall time of ``stead reclone secondary --force --json`` run in the
active's node, timed from the host (CLI start-up, gate, the passive's manifest, plan, copy,
verify and swap, then the active's check of the protected set); rsync's is timed inside the
passive (no ``nsenter`` or start-up in it). Then 5 % of the files (every 20th small and
every 20th large one, so also about 5 % of the bytes) are rewritten with new random content
on the active and the reclone runs again: only they should cross the link.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import labkit
from bench.labkit import GIB, MIB, PRIMARY, SECONDARY, Result
from stead.cli.client import AgentClient
from stead.lab.nodes import Lab

NAME = "reclone"
GOAL = "full: >= rsync (rsync / stead >= 1); 95 % identical: >= 3x faster than full"
ROOT = "/opt/lab/bench"
SMALL_MEAN = 8 * 1024
RSYNC_PORT = 8731
CHANGE_EVERY = 20  # every 20th file: 5 %

# Runs inside the active: the data set (argv: root, small files, large files, total bytes).
GENERATE_SCRIPT = f"""
import json, os, random, sys, time
root, small, large, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(5)
sizes = [rng.randint(0, {2 * SMALL_MEAN}) for _ in range(small)]
rest = total - sum(sizes)
start = time.monotonic()
def put(path, size):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, os.urandom(size))
    finally:
        os.close(fd)
for i, size in enumerate(sizes):
    directory = os.path.join(root, f"s{{i // 1000:03d}}")
    if i % 1000 == 0:
        os.makedirs(directory)
    put(os.path.join(directory, f"f{{i:06d}}"), size)
os.makedirs(os.path.join(root, "large"))
for i in range(large):
    put(os.path.join(root, "large", f"g{{i:04d}}"), rest // large + (i < rest % large))
print(json.dumps({{"seconds": time.monotonic() - start, "small_bytes": sum(sizes)}}))
"""

# Runs inside the active: rewrite every Nth small and every Nth large file (argv: root, N).
CHANGE_SCRIPT = """
import json, os, sys
root, every = sys.argv[1], int(sys.argv[2])
small, large = [], []
for directory, dirs, files in os.walk(root):
    dirs.sort()
    target = large if os.path.basename(directory) == "large" else small
    target.extend(os.path.join(directory, name) for name in sorted(files))
picked = small[::every] + large[::every]
changed = 0
for path in picked:
    size = os.path.getsize(path)
    with open(path, "r+b") as out:
        out.write(os.urandom(size))
    changed += size
print(json.dumps({"files": len(picked), "bytes": changed}))
"""


def run(quick: bool) -> Result:
    small, large = (4_980, 20) if quick else (49_800, 200)
    total = 200 * MIB if quick else 2 * GIB
    files = small + large
    result = Result(NAME, GOAL, "rsync time / full reclone time (incremental: see figures)")
    with labkit.lab(NAME, nodes=2, disk_size="2G" if quick else "8G") as lab:
        generated = in_node(lab, PRIMARY, GENERATE_SCRIPT, ROOT, small, large, total)
        if lab.exec(SECONDARY, ["test", "-e", ROOT]).returncode == 0:
            raise RuntimeError(f"{ROOT} exists on the passive before the full reclone")
        rsync_s, flush_s = rsync_baseline(lab)
        full_s, full, full_phases = timed_reclone(lab)
        check_copy(lab, files)
        changed = in_node(lab, PRIMARY, CHANGE_SCRIPT, ROOT, CHANGE_EVERY)
        incr_s, incr, incr_phases = timed_reclone(lab)
    ratio, speedup = (rsync_s + flush_s) / full_s, full_s / incr_s
    result.ratio = ratio
    result.met = ratio >= 1.0 and speedup >= 3.0
    result.figures = {
        "data": (
            f"{files:,} files, {labkit.mib(total)}: {small:,} of 0-16 KiB (mean 8 KiB),"
            f" {large} of {(total - generated['small_bytes']) / large / MIB:.1f} MiB"
        ),
        "rsync -a + sync -f (empty target)": (
            f"{labkit.secs(rsync_s + flush_s)} ({labkit.secs(rsync_s)} + {labkit.secs(flush_s)}"
            f" flush, {labkit.mib_s(total / (rsync_s + flush_s))})"
        ),
        "stead reclone, full (CLI wall)": f"{labkit.secs(full_s)} ({labkit.mib_s(total / full_s)})",
        "full: history": history_line(full),
        "full: phases": full_phases,
        "changed on the active": f"{changed['files']:,} files, {labkit.mib(changed['bytes'])}"
        f" ({changed['bytes']:,} B)",
        "stead reclone, 95 % identical (CLI wall)": labkit.secs(incr_s),
        "incremental: history": history_line(incr),
        "incremental: phases": incr_phases,
        "incremental: bytes moved / changed": f"{incr['bytes'] / max(changed['bytes'], 1):.3f}",
        "rsync / full reclone": f"{ratio:.2f} (goal >= 1)",
        "full / incremental reclone": f"{speedup:.2f} (goal >= 3)",
    }
    result.notes.append(f"data set generated in the active in {labkit.secs(generated['seconds'])}")
    return result


def in_node(lab: Lab, node: str, script: str, *args: object) -> dict[str, Any]:
    """A Python script in the node, then ``sync`` on the host (its dirty data written out)."""
    argv = [sys.executable, "-c", script, *map(str, args)]
    done = lab.exec(node, argv, capture=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"script in {node} failed ({done.returncode}): {done.stderr}")
    subprocess.run(["sync"], check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def rsync_target(lab: Lab) -> str:
    """A directory on the passive's system image, outside its system trees."""
    return str(lab.paths(SECONDARY).system_mount / "rsync-copy")


def rsync_baseline(lab: Lab) -> tuple[float, float]:
    """``rsync -a`` from the active's daemon into an empty directory, then its flush."""
    target = rsync_target(lab)
    lab.exec(SECONDARY, ["rm", "-rf", target], check=True)
    lab.exec(SECONDARY, ["mkdir", "-p", target], check=True)
    subprocess.run(["sync"], check=True)
    with labkit.rsync_daemon(lab, PRIMARY, "bench", ROOT, read_only=True, port=RSYNC_PORT) as url:
        result = labkit.nodeop(lab, SECONDARY, "timed", "rsync", "-a", url, f"{target}/")
        if result["rc"] != 0:
            raise RuntimeError(f"rsync failed ({result['rc']})")
        flush = labkit.nodeop(lab, SECONDARY, "timed", "sync", "-f", target)
    lab.exec(SECONDARY, ["rm", "-rf", target], check=True)  # the reclone's passive is empty
    subprocess.run(["sync"], check=True)
    return float(result["seconds"]), float(flush["seconds"])


def timed_reclone(lab: Lab) -> tuple[float, dict[str, Any], str]:
    """``stead reclone secondary --force --json`` in the active: wall seconds, the run's
    record in the history (bytes, files, duration) and when each phase was first seen."""
    subprocess.run(["sync"], check=True)
    watch = PhaseWatch(lab.socket_path(PRIMARY))
    argv = ["stead", "reclone", SECONDARY, "--force", "--json"]
    start = time.monotonic()
    watch.start_at(start)
    try:
        done = lab.exec(PRIMARY, argv, capture=True, timeout=3600)
        seconds = time.monotonic() - start
    finally:
        watch.stop()
    if done.returncode != 0:
        raise RuntimeError(f"stead reclone failed ({done.returncode}): {done.stderr.strip()}")
    run = json.loads(done.stdout)["result"][SECONDARY]["run"]
    history = lab.exec(PRIMARY, ["stead", "reclone", "history", "--json"], capture=True, check=True)
    record = next(r for r in json.loads(history.stdout) if r["run"] == run)
    return seconds, dict(record), watch.describe(seconds)


def history_line(record: dict[str, Any]) -> str:
    return (
        f"{record['files']:,} files, {labkit.mib(record['bytes'])} ({record['bytes']:,} B),"
        f" {labkit.secs(record['duration'])}"
    )


def check_copy(lab: Lab, files: int) -> None:
    """The passive holds every file of the data set (the reclone checked each hash)."""
    count = lab.exec(SECONDARY, ["find", ROOT, "-type", "f"], capture=True, check=True)
    found = len(count.stdout.splitlines())
    if found != files:
        raise RuntimeError(f"the passive holds {found} of {files} files after the reclone")


class PhaseWatch:
    """Polls the active's reclone job (another process: nothing to await) and notes when
    each phase (gate, manifest, plan, copy, swap, done, check) was first seen."""

    def __init__(self, socket_path: Path) -> None:
        self.client = AgentClient(socket_path, timeout=5)
        self.first_new = self._first_free_id()
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = 0.0

    def _job(self, job_id: int) -> dict[str, Any] | None:
        with contextlib.suppress(Exception):
            return dict(self.client.call("GET", f"/v1/jobs/{job_id}"))
        return None

    def _first_free_id(self) -> int:
        job_id = 1
        while job_id < 1000 and self._job(job_id) is not None:
            job_id += 1
        return job_id

    def start_at(self, start: float) -> None:
        self._start = start
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        found: int | None = None
        while not self._stop.wait(0.1):
            ids = [found] if found else range(self.first_new, self.first_new + 5)
            for job_id in ids:
                job = self._job(job_id)
                if job is None or job.get("kind") != "reclone":
                    continue
                found = job_id
                phase = str((job.get("progress") or {}).get("phase", ""))
                if phase and phase not in self.seen:
                    self.seen[phase] = time.monotonic() - self._start

    def describe(self, total: float) -> str:
        if not self.seen:
            return "not observed"
        marks = sorted(self.seen.items(), key=lambda kv: kv[1])
        spans = []
        for (phase, at), (_, until) in zip(marks, [*marks[1:], ("end", total)], strict=True):
            spans.append(f"{phase} {until - at:.1f}")
        return f"start {marks[0][1]:.1f}, " + ", ".join(spans) + " s"
