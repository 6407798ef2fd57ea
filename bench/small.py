"""100,000 new 4 KiB files until applied, against ``rsync -a`` of the same set."""

from __future__ import annotations

from bench import labkit
from bench.labkit import PRIMARY, Result

NAME = "small"
GOAL = "at least as fast as rsync (rsync time / stead time >= 1)"


def run(quick: bool) -> Result:
    files = 10_000 if quick else 100_000
    result = Result(NAME, GOAL, "rsync time / stead time")
    with labkit.lab(NAME, disk_size="4G") as lab:
        stead = labkit.nodeop(lab, PRIMARY, "write", "/srv/lab/small", files, 4096, 1000, 900)
        with labkit.rsync_daemon(lab) as url:
            rsync_s = labkit.rsync_push(lab, "/srv/lab/small", url)
    stead_s = stead["total_s"]
    ratio = rsync_s / stead_s
    result.ratio, result.met = ratio, ratio >= 1.0
    result.figures = {
        "data": f"{files:,} x 4 KiB in {files // 1000} dirs",
        "stead": f"{labkit.secs(stead_s)} ({files / stead_s:,.0f} files/s)",
        "stead write part": labkit.secs(stead["write_s"]),
        "rsync -a": f"{labkit.secs(rsync_s)} ({files / rsync_s:,.0f} files/s)",
    }
    return result
