"""1 % of the files of a 1 GiB set changed in place, against an incremental ``rsync -a``."""

from __future__ import annotations

from bench import labkit
from bench.labkit import MIB, PRIMARY, SECONDARY, Result

NAME = "changed"
GOAL = ">= 3x faster than incremental rsync"
CHANGE_BYTES = 4096


def run(quick: bool) -> Result:
    files = 256 if quick else 1024
    changed = max(1, files // 100)
    root = "/srv/lab/set"
    result = Result(NAME, GOAL, "rsync time / stead time")
    with labkit.lab(NAME, disk_size="6G") as lab:
        labkit.nodeop(lab, PRIMARY, "write", root, files, MIB, 1000, 600)
        with labkit.rsync_daemon(lab) as url:
            initial_s = labkit.rsync_push(lab, root, url)
            # rsync leaves its copy dirty in the passive's page cache; the applier's syncfs
            # would pay for writing it out, so flush it first (see flush figure).
            flush_s = labkit.flush_node_fs(lab, SECONDARY)
            stead = labkit.nodeop(
                lab, PRIMARY, "change", root, files, 1000, changed, CHANGE_BYTES, 600
            )
            rsync_s = labkit.rsync_push(lab, root, url)
            bytes_sent = [n for n in labkit.agent_status(lab)["nodes"] if n["role"] == "passive"]
    stead_s = stead["total_s"]
    ratio = rsync_s / stead_s
    result.ratio, result.met = ratio, ratio >= 3.0
    result.figures = {
        "set": f"{files} x 1 MiB, {changed} files changed ({CHANGE_BYTES} B each, mid-file)",
        "stead": labkit.secs(stead_s),
        "rsync -a (incremental)": labkit.secs(rsync_s),
        "rsync -a (initial, not timed)": labkit.secs(initial_s),
        "flush of rsync's dirty copy (not timed)": labkit.secs(flush_s),
        "stead bytes sent (whole run)": labkit.mib(bytes_sent[0]["bytes_sent"]),
    }
    return result
